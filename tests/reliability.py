"""The reliability table: tests of faults and bad inputs record what they tried, what the user saw and what
was lost; ``conftest.pytest_sessionfinish`` writes the rows as JSON to ``$COMPOSER_KD_RELIABILITY_JSON``
(when set) — the reliability table of ``docs/reliability.md`` is that file through ``markdown`` (``python
tests/reliability.py FILE``); ``tests/test_docs.py`` checks that the page's table is in this format."""

import re
from typing import Any

ROWS: list[dict[str, Any]] = []


def record(fault: str, user_sees: str, lost: str = 'nothing', traceback: bool = False) -> None:
    """One row: the fault, the first line the user saw, what the run lost, whether a traceback was printed."""
    ROWS.append({'fault': fault, 'user_sees': user_sees, 'lost': lost, 'traceback': traceback})


def _cell(text: str, limit: int = 227) -> str:
    """A table cell: exit statuses for the CLI's prefixes, temporary folders as ``…``, long lines cut."""
    text = re.sub(r'^composer-kd [\w-]+: error: ', 'exit 2: ', text)
    text = re.sub(r'^composer-kd [\w-]+: stopped: ', 'exit 1: ', text)
    text = re.sub(r'/tmp/pytest-of-[^/]+/pytest-\d+/[^/ ]+/', '…/', text)
    text = text.replace('|', '\\|').replace('\n', ' ')
    return text if len(text) <= limit else text[:limit] + '…'


def markdown(rows: list[dict[str, Any]]) -> str:
    """The reliability table (``docs/reliability.md``): faults and bad inputs (sorted), then the bad config values,
    folded."""
    values = sorted((r for r in rows if r['fault'].startswith('train ')), key=lambda r: r['fault'])
    faults = sorted((r for r in rows if not r['fault'].startswith('train ')), key=lambda r: r['fault'])
    lines = ['| fault | what the user sees | lost |', '|---|---|---|']
    lines += [f'| {_cell(r["fault"])} | {_cell(r["user_sees"])} | {_cell(r["lost"])} |' for r in faults]
    lines += ['', f'<details><summary>{len(values)} bad config values, each refused in one line before anything '
              'loads</summary>', '', '| command | what the user sees | lost |', '|---|---|---|']
    lines += [f'| {_cell(r["fault"])} | {_cell(r["user_sees"])} | {_cell(r["lost"])} |' for r in values]
    return '\n'.join([*lines, '', '</details>'])


if __name__ == '__main__':  # python tests/reliability.py reliability.json > table.md
    import json
    import sys
    print(markdown(json.load(open(sys.argv[1]))))

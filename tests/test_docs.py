"""The documentation a newcomer reads — README.md, CONTRIBUTING.md and docs/*.md — against the code: every relative
link and anchor resolves, every YAML block parses, every recipe path exists, every ``composer-kd`` command in a
bash block names a real subcommand whose ``--help`` runs, and the generated pages equal what generates them.

A YAML block that is deliberately not a whole document is marked by a ``<!-- fragment -->`` line just before it.
"""

import argparse
import glob
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote

import pytest
import yaml
from reliability import markdown

from composer_kd.cli import _parser

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / 'README.md', ROOT / 'CONTRIBUTING.md', *sorted((ROOT / 'docs').glob('*.md'))]
FENCE = re.compile(r'^\s*(`{3,}|~{3,})\s*([\w+-]*)')


def _ids(page: Path) -> str:
    return str(page.relative_to(ROOT))


def _split(text: str) -> tuple[str, list[tuple[str, str, str]]]:
    """The page's prose (code blocks blanked, so line numbers hold) and its code blocks as (language, body, the
    last non-blank line before the fence)."""
    prose, blocks = [], []
    fence, language, body, before = None, '', [], ''
    last = ''
    for line in text.split('\n'):
        match = FENCE.match(line)
        if fence is None and match:
            fence, language, body, before = match.group(1), match.group(2).lower(), [], last
            prose.append('')
        elif fence is not None and line.strip().startswith(fence[0] * len(fence)) and not line.strip().strip(fence[0]):
            blocks.append((language, '\n'.join(body), before))
            fence = None
            prose.append('')
        elif fence is not None:
            body.append(line)
            prose.append('')
        else:
            prose.append(line)
            if line.strip():
                last = line.strip()
    assert fence is None, 'a code block is not closed'
    return '\n'.join(prose), blocks


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: links as their text, lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r'!?\[([^\]]*)\]\([^)]*\)', r'\1', heading)
    text = re.sub(r'<[^>]+>', '', text).strip().lower()
    return re.sub(r'[^\w\- ]', '', text).replace(' ', '-')


def _anchors(page: Path) -> set[str]:
    prose, _ = _split(page.read_text())
    seen: dict[str, int] = {}
    anchors = set()
    for match in re.finditer(r'^#{1,6}\s+(.+?)\s*#*\s*$', prose, re.MULTILINE):
        slug = _slug(match.group(1))
        anchors.add(slug if slug not in seen else f'{slug}-{seen[slug]}')
        seen[slug] = seen.get(slug, 0) + 1
    return anchors


def _links(page: Path) -> list[str]:
    prose, _ = _split(page.read_text())
    prose = re.sub(r'`[^`\n]*`', '``', prose)  # code spans are not links
    return re.findall(r'\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+"[^"]*")?\s*\)', prose)


def test_github_slugs() -> None:
    assert _slug("The quickstart's result") == 'the-quickstarts-result'
    assert _slug('`composer-kd prune`') == 'composer-kd-prune'
    assert _slug('What you get, and the Python API') == 'what-you-get-and-the-python-api'
    assert _slug('No logits: the fused LM-head loss') == 'no-logits-the-fused-lm-head-loss'
    assert _slug('See [the docs](docs/x.md) — twice') == 'see-the-docs--twice'


def test_every_page_is_checked() -> None:
    names = {_ids(p) for p in PAGES}
    assert {'README.md', 'CONTRIBUTING.md', 'docs/config-reference.md', 'docs/reliability.md'} <= names
    assert all(_links(p) for p in (ROOT / 'README.md', ROOT / 'CONTRIBUTING.md'))


@pytest.mark.parametrize('page', PAGES, ids=_ids)
def test_relative_links_resolve(page: Path) -> None:
    broken = []
    for target in _links(page):
        if re.match(r'^[a-z][a-z0-9+.-]*:', target, re.IGNORECASE):  # https:, mailto:, ...
            continue
        path, _, anchor = target.partition('#')
        file = (page.parent / unquote(path)).resolve() if path else page
        if not file.exists():
            broken.append(f'{target}: no such file')
        elif anchor and file.suffix == '.md' and anchor not in _anchors(file):
            broken.append(f'{target}: no heading #{anchor} in {file.relative_to(ROOT)}')
        elif anchor and file.suffix != '.md':
            broken.append(f'{target}: an anchor into a file that is not Markdown')
    assert not broken, broken


@pytest.mark.parametrize('page', PAGES, ids=_ids)
def test_yaml_blocks_parse(page: Path) -> None:
    for language, body, before in _split(page.read_text())[1]:
        if language not in ('yaml', 'yml') or before == '<!-- fragment -->':
            continue
        try:
            parsed = yaml.safe_load(body)
        except yaml.YAMLError as e:
            pytest.fail(f'{_ids(page)}: a YAML block does not parse:\n{body}\n{e}')
        assert isinstance(parsed, dict), f'{_ids(page)}: a YAML block is not a mapping:\n{body}'


def _expand(pattern: str) -> list[str]:
    """Brace expansion, as a shell does it: ``a/{b,c}.yaml`` → ``a/b.yaml``, ``a/c.yaml``."""
    match = re.search(r'\{([^{}]*)\}', pattern)
    if not match:
        return [pattern]
    return [p for alt in match.group(1).split(',') for p in _expand(pattern[:match.start()] + alt +
                                                                     pattern[match.end():])]


RECIPE_PATH = re.compile(r'(?<![\w/.-])((?:composer_kd/)?yamls/[\w./{},*-]*[\w*}])')


@pytest.mark.parametrize('page', PAGES, ids=_ids)
def test_recipe_paths_exist(page: Path) -> None:
    missing = [path for mention in RECIPE_PATH.findall(page.read_text()) for path in _expand(mention)
               if not (glob.glob(str(ROOT / path)) if '*' in path else (ROOT / path).exists())]
    assert not missing, f'{_ids(page)} names recipes that do not exist: {missing}'


def test_recipe_paths_are_found() -> None:
    found = set(RECIPE_PATH.findall((ROOT / 'README.md').read_text()))
    assert {'yamls/tiny-cpu.yaml', 'yamls/tiny-cpu-offline.yaml', 'yamls/tiny-cpu-ensemble.yaml'} <= found
    assert not RECIPE_PATH.findall('LLM Foundry\'s scripts/train/yamls/pretrain/x.yaml')  # not one of ours


def _subcommands() -> set[str]:
    action = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    return set(action.choices)


def _commands(page: Path) -> list[str]:
    """The subcommand of every ``composer-kd SUB`` and ``-m composer_kd SUB`` in the page's bash blocks (and on the
    ``$ `` prompt lines of blocks without a language)."""
    names = []
    for language, body, _ in _split(page.read_text())[1]:
        if not language:
            body = '\n'.join(line[2:] for line in body.split('\n') if line.startswith('$ '))
        if language in ('bash', 'sh', 'shell', 'console', ''):
            body = re.sub(r'(^|\s)#.*$', '', body, flags=re.MULTILINE)  # comments
            names += re.findall(r'(?:\bcomposer-kd|-m\s+composer_kd)\s+(?:--debug\s+)?([A-Za-z][\w-]*)', body)
    return names


COMMANDS = sorted({name for page in PAGES for name in _commands(page)})


@pytest.mark.parametrize('page', PAGES, ids=_ids)
def test_bash_blocks_name_real_subcommands(page: Path) -> None:
    unknown = sorted(set(_commands(page)) - _subcommands())
    assert not unknown, f'{_ids(page)}: no such composer-kd subcommand: {unknown}'


def test_the_readme_shows_the_main_commands() -> None:
    assert {'quickstart', 'make-tiny-assets', 'train', 'precompute-teacher'} <= set(_commands(ROOT / 'README.md'))


@pytest.mark.parametrize('name', [n for n in COMMANDS if n in _subcommands()])
def test_subcommand_help_runs(name: str) -> None:
    script = Path(sys.executable).parent / 'composer-kd'
    command = [str(script)] if script.exists() else [sys.executable, '-m', 'composer_kd']
    proc = subprocess.run([*command, name, '--help'], check=False, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f'usage: composer-kd {name}'), proc.stdout[:200]


def test_the_readme_starts_with_the_main_job_and_the_tests() -> None:
    """The first two commands are the quickstart and the test command; `.ci/run` runs the same test command."""
    first, second = [body for language, body, _ in _split((ROOT / 'README.md').read_text())[1][:2]
                     if language == 'bash']
    assert first.startswith('python3 -m venv .venv') and first.endswith('composer-kd quickstart')
    ci = (ROOT / '.ci' / 'run').read_text().split('\n')
    marker = next(i for i, line in enumerate(ci) if "the README's test command" in line and line.startswith('# ---'))
    assert second == ci[marker + 1]


def test_the_readme_quickstart_table_matches_its_page() -> None:
    """The README's headline results (the "Measured on" paragraph and the table) are docs/quickstart.md's."""
    readme = (ROOT / 'README.md').read_text()
    match = re.search(r'^Measured on .*?\n\n(?:\|[^\n]*\n)+', readme, re.DOTALL | re.MULTILINE)
    assert match and '| `--seed` |' in match.group(0)
    assert match.group(0) in (ROOT / 'docs' / 'quickstart.md').read_text()


def test_config_reference_is_generated_from_the_schemas() -> None:
    proc = subprocess.run([sys.executable, '-m', 'composer_kd.config.reference'], check=False, capture_output=True,
                          text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert (ROOT / 'docs' / 'config-reference.md').read_text() == proc.stdout, (
        'docs/config-reference.md differs from the schemas: python -m composer_kd.config.reference > '
        'docs/config-reference.md')


def _cells(line: str) -> list[str]:
    return [c.strip().replace('\\|', '|') for c in re.split(r'(?<!\\)\|', line)[1:-1]]


def test_reliability_table_is_what_tests_reliability_renders() -> None:
    """docs/reliability.md's table, read back into rows, renders to itself with ``tests/reliability.py``: sorted,
    the bad config values folded and counted, the cells cut and escaped as the renderer does."""
    text = (ROOT / 'docs' / 'reliability.md').read_text()
    start = text.index('| fault | what the user sees | lost |')
    table = text[start:text.index('</details>', start) + len('</details>')]
    headers = ('| fault |', '| command |')
    rows = [dict(zip(('fault', 'user_sees', 'lost'), _cells(line)), traceback=False)
            for line in table.split('\n') if line.startswith('| ') and not line.startswith(headers)]
    assert len(rows) > 50
    assert markdown(rows) == table

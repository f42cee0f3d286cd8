"""The config reference (``docs/config-reference.md``), rendered from the schemas so it cannot drift from what is
checked: ``python -m composer_kd.config.reference > docs/config-reference.md`` (a test compares the file).
"""

from typing import Any

from composer_kd.config.schema import Free, Key, Section, SectionList, walk_keys

__all__ = ['render_reference']


def _value(value: Any) -> str:
    if value is None:
        return ''
    if isinstance(value, bool):
        return f'`{str(value).lower()}`'
    return f'`{value}`'


def _row(path: str, entry: Any) -> str:
    if isinstance(entry, Key):
        kind = entry.kind.what
    elif isinstance(entry, (Section, Free)):
        kind = 'a mapping'
    elif isinstance(entry, SectionList):
        kind = 'a list of mappings'
    else:
        kind = f'{"`{NAME: arguments}`" if entry.many else "`{name: NAME, ...}`"} (names: {entry.table})'
    required = ' **(required)**' if getattr(entry, 'required', False) else ''
    default = _value(entry.default) if isinstance(entry, Key) else ''
    help_text = entry.help.replace('|', '\\|').replace('\n', ' ')
    return f'| `{path}`{required} | {kind.replace("|", chr(92) + "|")} | {default} | {entry.dest} | {help_text} |'


def render_reference(schemas: list[tuple[str, Section, str]]) -> str:
    """Markdown tables of every key of ``schemas`` (title, schema, introduction), in schema order."""
    from composer_kd.config.registry import REGISTRIES
    lines = ['# Config reference', '',
             'Generated from the schemas in `composer_kd/config/` (`python -m composer_kd.config.reference > '
             'docs/config-reference.md`); `tests/test_docs.py` fails when this file and the schemas differ.', '',
             '"Goes to" says what reads a key: `Trainer` (Composer\'s, under the same name, as written), '
             '`composer-kd` (read here to build something), `model`, `DataLoader`, `StreamingDataset`, `FSDP`.']
    for title, schema, intro in schemas:
        lines += ['', f'## {title}', '', intro, '', '| key | value | default | goes to | what it does |',
                  '|---|---|---|---|---|']
        lines += [_row(path, entry) for path, entry in walk_keys(schema)]
    lines += ['', '## Registered names', '']
    for table, names in REGISTRIES.items():
        lines.append(f'- {table}: {", ".join(f"`{n}`" for n in names)}')
    return '\n'.join(lines) + '\n'


def _main() -> None:
    from composer_kd.config.run_schema import RUN_SCHEMA
    print(render_reference([('Run config (`composer-kd train`)', RUN_SCHEMA,
                             'The layout of LLM Foundry\'s `TrainConfig`; distillation settings live under `model:`.')]),
          end='')


if __name__ == '__main__':
    _main()

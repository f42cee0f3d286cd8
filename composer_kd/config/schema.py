"""A config schema: every key with its kind, default, help and where it goes, and the walk that checks a config
against it — unknown keys (with a "did you mean"), missing required keys, and each value's kind.

The schemas themselves (``run_schema.py``, ``precompute_schema.py``) are declarations; validation, the
``train --check`` report and the config reference (``reference.py``, ``docs/config-reference.md``) are all
derived from them, so adding a key is one edit.
"""

import dataclasses
import difflib
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

from composer_kd.config.kinds import Kind
from composer_kd.errors import ConfigError

__all__ = ['Entry', 'Free', 'Key', 'Registry', 'Section', 'SectionList', 'check', 'did_you_mean', 'walk_keys']

# Where a value goes: what reads it. The config reference groups keys by these.
TRAINER = 'Trainer'  # passed to Composer's Trainer under the same name
RUN = 'composer-kd'  # read by composer-kd itself (the process, the builders, the commands)
MODEL = 'model'  # the DistillationModel and the models it is built from
LOADER = 'DataLoader'  # torch's DataLoader
DATASET = 'StreamingDataset'  # Streaming's StreamingDataset
FSDP = 'FSDP'  # Composer's parallelism_config['fsdp']


@dataclasses.dataclass(frozen=True)
class Key:
    """A value.

    Attributes:
        name (str): its name in its section.
        kind (Kind): the values it takes.
        help (str): what it does, one or two sentences.
        default (Any): the value when absent (``None``: unset, the consumer's own default applies).
        dest (str): what reads it (``TRAINER``, ``RUN``, ...).
        required (bool): absent or null is an error.
        refusal (str): the error for a value of another kind, formatted with ``path``, ``what`` and ``value``.
    """
    name: str
    kind: Kind
    help: str
    default: Any = None
    dest: str = RUN
    required: bool = False
    refusal: str = '{path} must be {what}, got {value!r}'


@dataclasses.dataclass(frozen=True)
class Section:
    """A mapping of known keys (``entries``); any other key is refused (``unknown_key``: the error, formatted with
    ``path``, ``key``, ``hint`` and ``allowed``; default: "unknown key PATH.KEY")."""
    name: str
    help: str
    entries: tuple['Entry', ...]
    required: bool = False
    dest: str = RUN
    unknown_key: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class SectionList:
    """A non-empty list of sections of one shape (``model.teachers``)."""
    name: str
    help: str
    item: Section
    required: bool = False
    dest: str = MODEL


@dataclasses.dataclass(frozen=True)
class Registry:
    """Objects named from a registry (``config/registry.py``): one, ``{name: NAME, **kwargs}`` (``optimizer``), or
    many, ``{NAME: kwargs}`` (``callbacks``). Names are checked here, keyword arguments against the class once it
    is imported (``builders/objects.py``)."""
    name: str
    help: str
    table: str
    many: bool
    required: bool = False
    dest: str = TRAINER


@dataclasses.dataclass(frozen=True)
class Free:
    """A mapping passed on as it is (its keys belong to someone else: ``variables``, a model's ``config``)."""
    name: str
    help: str
    dest: str = RUN
    required: bool = False


Entry = Union[Key, Section, SectionList, Registry, Free]


def did_you_mean(name: str, known: Sequence[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest known name, or nothing."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f' (did you mean {close[0]!r}?)' if close else ''


def _join(path: str, name: Any) -> str:
    return f'{path}.{name}' if path else str(name)


def _check_mapping(value: Any, section: Section, path: str) -> None:
    if not isinstance(value, Mapping):
        raise ConfigError(f'{path} must be a mapping, got {value!r}')
    names = [e.name for e in section.entries]
    unknown = sorted(set(value) - set(names), key=str)
    if unknown:
        key = unknown[0]
        if section.unknown_key is not None:
            raise ConfigError(section.unknown_key.format(path=path, key=key, hint=did_you_mean(str(key), names),
                                                         allowed=sorted(names)))
        if not path:
            raise ConfigError(f'unknown top-level key {key!r}{did_you_mean(str(key), names)}; put free values under '
                              f'`variables:` (allowed keys: {sorted(names)})')
        raise ConfigError(f'unknown key {path}.{key}{did_you_mean(str(key), names)}; allowed in {path}: '
                          f'{sorted(names)}')
    for entry in section.entries:
        if getattr(entry, 'required', False) and value.get(entry.name) is None:
            where = _join(path, entry.name)
            raise ConfigError(f'missing required key {where!r}' if not path else f'missing required key {where}')
    for entry in section.entries:
        item = value.get(entry.name)
        if item is not None:
            _check_entry(item, entry, _join(path, entry.name))


def _check_entry(value: Any, entry: Entry, path: str) -> None:
    from composer_kd.config.registry import REGISTRIES  # the names only: nothing is imported
    if isinstance(entry, Key):
        if not entry.kind.accepts(value):
            raise ConfigError(entry.refusal.format(path=path, what=entry.kind.what, value=value))
    elif isinstance(entry, Section):
        _check_mapping(value, entry, path)
    elif isinstance(entry, SectionList):
        if not isinstance(value, list) or not value:
            raise ConfigError(f'{path} must be a non-empty list of {entry.help}, got {value!r}')
        for i, item in enumerate(value):
            _check_mapping(item, entry.item, f'{path}.{i}')
    elif isinstance(entry, Registry):
        known = REGISTRIES[entry.table]
        if not isinstance(value, Mapping):
            what = 'a mapping of name -> arguments' if entry.many else 'a mapping with a name'
            raise ConfigError(f'{path} must be {what}, got {value!r}')
        if not entry.many and value.get('name') is None:
            raise ConfigError(f'missing required key {path}.name')
        for name, kwargs in (value.items() if entry.many else [(value['name'], value)]):
            if name not in known:
                raise ConfigError(f'{path}: unknown name {name!r}{did_you_mean(str(name), list(known))}; known: '
                                  f'{sorted(known)}')
            if entry.many and kwargs is not None and not isinstance(kwargs, Mapping):
                raise ConfigError(f'{path}.{name} must be a mapping of arguments, got {kwargs!r}')
    elif isinstance(entry, Free):
        if not isinstance(value, Mapping):
            raise ConfigError(f'{path} must be a mapping, got {value!r}')


def check(cfg: Mapping[str, Any], schema: Section, path: str = '') -> None:
    """Refuses, with one line naming the key, the first unknown key, missing required key or value of the wrong
    kind in ``cfg`` (``path``: where ``cfg`` sits in a larger config, '' at the top).

    Raises:
        ConfigError: naming the key and the value.
    """
    _check_mapping(cfg, schema, path)


def walk_keys(section: Section, path: str = '') -> Iterator[tuple[str, Entry]]:
    """Every entry of ``section`` and its sections, depth first, with its dotted path (a list's items as ``N``)."""
    for entry in section.entries:
        where = _join(path, entry.name)
        yield where, entry
        if isinstance(entry, Section):
            yield from walk_keys(entry, where)
        elif isinstance(entry, SectionList):
            yield from walk_keys(entry.item, f'{where}.N')


def find(section: Section, path: str) -> Optional[Entry]:
    """The entry at dotted ``path`` (list items as ``N``), or None."""
    for where, entry in walk_keys(section):
        if where == path:
            return entry
    return None

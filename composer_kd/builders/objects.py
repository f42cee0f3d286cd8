"""The optimizer, scheduler, algorithms, callbacks and loggers a run config names (``config/registry.py``): their
keyword arguments checked against each class — unknown keywords, missing required ones, values against the type
hints — then each object built on stand-ins (the optimizer on one dummy parameter) and discarded, so a wrong value
fails, named, before any model loads.

Only a ``ValueError`` a constructor raises about its arguments becomes a user error (``optimizer.decoupled_adamw:
Invalid learning rate: -1``); anything else a constructor raises is a bug and keeps its traceback.
"""

import collections.abc
import importlib.util
import inspect
import logging
import pathlib
import types
import typing
from typing import Any, Callable, Mapping, Optional

import torch
from composer.core import Time, TimeUnit

from composer_kd.config.kinds import is_int, is_number
from composer_kd.config.registry import REGISTRIES, resolve
from composer_kd.errors import ConfigError

__all__ = ['check_registered_objects', 'construct']

# The config section of each registry.
_SECTIONS = {'optimizer': 'optimizers', 'scheduler': 'schedulers', 'algorithms': 'algorithms',
             'callbacks': 'callbacks', 'loggers': 'loggers'}
# Values the classes take as plain strings but check only when first used.
_CHOICES = {
    ('algorithms', 'gradient_clipping', 'clipping_type'): ('adaptive', 'norm', 'value'),
    ('callbacks', 'speed_monitor', 'time_unit'): ('seconds', 'minutes', 'hours', 'days'),
    ('callbacks', 'runtime_estimator', 'time_unit'): ('seconds', 'minutes', 'hours', 'days'),
}
# Loggers whose packages are optional extras: checked importable, not built (their constructors reach services).
_SERVICE_LOGGERS = {'wandb': 'wandb', 'mlflow': 'mlflow'}
# Arguments the builder supplies itself (the optimizer's parameters), never the YAML.
_SUPPLIED = frozenset({'self', 'params'})


def _matches(value: Any, hint: Any) -> Optional[bool]:
    """Whether a YAML value fits a constructor's type hint; ``None`` where the hint says nothing checkable."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        verdicts = [_matches(value, arg) for arg in args]
        return True if True in verdicts else (None if None in verdicts else False)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return is_int(value)
    if hint is float:
        return is_number(value)
    if hint in (str, pathlib.Path):
        return isinstance(value, str)
    if hint is torch.Tensor:
        return False  # a YAML value is never a tensor; the union's other members decide
    if hint is Time:
        try:
            Time.from_input(value, TimeUnit.EPOCH)
            return not isinstance(value, bool)
        except (ValueError, TypeError):
            return False
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_matches(v, a) is not False for v, a in zip(value, args))
        return all(_matches(v, args[0]) is not False for v in value) if args else True
    if origin in (dict, collections.abc.Mapping) or hint in (dict, collections.abc.Mapping):
        return isinstance(value, Mapping)
    return None


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return ' or '.join(_describe(a) for a in typing.get_args(hint) if a is not torch.Tensor)
    names = {type(None): 'null', bool: 'true or false', int: 'an integer', float: 'a number', str: 'a string',
             pathlib.Path: 'a path', Time: 'a time such as 100ba'}
    if hint in names:
        return names[hint]
    if typing.get_origin(hint) in (tuple, list):
        items = [_describe(a) for a in typing.get_args(hint) if a is not Ellipsis]
        return f'a list of {len(items)} ({", ".join(items)})' if Ellipsis not in typing.get_args(hint) else 'a list'
    return getattr(hint, '__name__', str(hint))


def _check_kwargs(section: str, name: str, cls: Callable[..., Any], kwargs: Mapping[str, Any]) -> None:
    """Unknown keywords, required ones missing, and each value against the constructor's type hints."""
    params = inspect.signature(cls).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(kwargs) - set(params))
        if unknown:
            allowed = sorted(k for k in params if k not in _SUPPLIED)
            raise ConfigError(f'{section}.{name}: unknown key {unknown[0]!r}; allowed: {allowed}')
    missing = [k for k, p in params.items() if k not in _SUPPLIED and p.default is inspect.Parameter.empty
               and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and k not in kwargs]
    if missing:
        raise ConfigError(f'{section}.{name}: missing required key {missing[0]!r}')
    try:
        hints = typing.get_type_hints(cls.__init__ if isinstance(cls, type) else cls)
    except Exception:  # unresolvable hints (a forward reference to an optional package): nothing to check here
        hints = {}
    prefix = section if section in ('optimizer', 'scheduler') else f'{section}.{name}'  # as the YAML spells it
    for key, value in kwargs.items():
        if key in hints and _matches(value, hints[key]) is False:
            raise ConfigError(f'{prefix}.{key} must be {_describe(hints[key])}, got {value!r}')
        choices = _CHOICES.get((section, name, key))
        if choices is not None and value not in choices:
            raise ConfigError(f'{prefix}.{key} must be one of {list(choices)}, got {value!r}')
        if section == 'scheduler' and key.startswith('t_'):  # kept as strings until the first step: parse now
            try:
                Time.from_input(value, TimeUnit.EPOCH)
            except (ValueError, TypeError):
                raise ConfigError(f'{section}.{key} must be a time such as 100ba or 0.1dur, got {value!r}') from None


def construct(section: str, name: str, kwargs: Mapping[str, Any], *args: Any) -> Any:
    """Builds the object registered as ``name`` for config section ``section`` (``optimizer``, ``callbacks``, ...)
    from its YAML keyword arguments (``args``: what the builder supplies, e.g. the optimizer's parameters).

    Raises:
        ConfigError: for a keyword the class does not take, one it needs and lacks, a value of the wrong type, or
            a ``ValueError`` of the constructor about its arguments.
    """
    cls = resolve(_SECTIONS[section], name)
    kwargs = dict(kwargs or {})
    _check_kwargs(section, name, cls, kwargs)
    try:
        return cls(*args, **kwargs)
    except ValueError as e:
        # composer-kd's own classes name the key first ("interval must be ..."): callbacks.kd_monitor.interval ...
        joint = '.' if cls.__module__.startswith('composer_kd.') else ': '
        raise ConfigError(f'{section}.{name}{joint}{e}'.splitlines()[0]) from e


def _entries(cfg: Mapping[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """``(section, name, kwargs)`` of every registered object a run config names."""
    entries = []
    for section in ('optimizer', 'scheduler'):
        if cfg.get(section) is not None:
            entries.append((section, cfg[section]['name'], {k: v for k, v in cfg[section].items() if k != 'name'}))
    for section in ('algorithms', 'callbacks', 'loggers'):
        entries += [(section, name, dict(kwargs or {})) for name, kwargs in (cfg.get(section) or {}).items()]
    return entries


def check_registered_objects(cfg: Mapping[str, Any]) -> None:
    """Builds the optimizer (on a dummy parameter), scheduler, algorithms, callbacks and loggers of ``cfg`` and
    discards them, so a wrong value fails now, named, instead of after the models have loaded."""
    quiet = logging.getLogger('composer')
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # building a callback may warn about things that only matter in a run
    try:
        for section, name, kwargs in _entries(cfg):
            if section == 'loggers' and name in _SERVICE_LOGGERS:
                if importlib.util.find_spec(_SERVICE_LOGGERS[name]) is None:
                    raise ConfigError(f'loggers.{name}: the {name} package is not installed (pip install '
                                      f'"composer-kd[{name}]")')
                continue
            if section == 'callbacks' and name in ('early_stopper', 'threshold_stopper'):
                kwargs.setdefault('comp', 'lt')  # both filled in by the builder; checked separately
                kwargs.setdefault('dataloader_label', 'eval')
            args = ([torch.nn.Parameter(torch.zeros(1))],) if section == 'optimizer' else ()
            construct(section, name, kwargs, *args)
    finally:
        quiet.setLevel(level)


assert set(_SECTIONS.values()) == set(REGISTRIES)

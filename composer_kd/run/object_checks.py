"""Checks of the optimizer, scheduler, algorithm, callback and logger sections of a run config: each keyword
against its class's type hints, then the object built on stand-ins (the optimizer on one dummy parameter) and
discarded — cheap, and it catches what the real build would, before any model loads or process group exists."""

import collections.abc
import importlib.util
import logging
import pathlib
import types
import typing
from typing import Any, Callable, Mapping, Optional

import torch
from composer.core import Time, TimeUnit

from composer_kd.errors import ConfigError
from composer_kd.run.registry import ALGORITHMS, CALLBACKS, LOGGERS, OPTIMIZERS, SCHEDULERS
from composer_kd.run.value_checks import is_int, is_number

__all__ = ['check_registered_objects']

# Values the classes take as plain strings but check only when first used.
_CHOICES = {
    ('algorithms', 'gradient_clipping', 'clipping_type'): ('adaptive', 'norm', 'value'),
    ('callbacks', 'speed_monitor', 'time_unit'): ('seconds', 'minutes', 'hours', 'days'),
    ('callbacks', 'runtime_estimator', 'time_unit'): ('seconds', 'minutes', 'hours', 'days'),
}
# Loggers whose packages are optional extras: checked importable, not built (their constructors reach services).
_SERVICE_LOGGERS = {'wandb': 'wandb', 'mlflow': 'mlflow'}


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


def _check_typed_kwargs(section: str, name: str, cls: Callable[..., Any], kwargs: Mapping[str, Any]) -> None:
    """Checks each keyword against the constructor's type hints and the known string choices."""
    try:
        hints = typing.get_type_hints(cls.__init__ if isinstance(cls, type) else cls)
    except Exception:  # unresolvable hints: the build below still checks
        hints = {}
    prefix = section if section in ('optimizer', 'scheduler') else f'{section}.{name}'  # as the YAML spells it
    for key, value in kwargs.items():
        if key in hints and _matches(value, hints[key]) is False:
            raise ConfigError(f'{prefix}.{key} must be {_describe(hints[key])}, got {value!r}')
        choices = _CHOICES.get((section, name, key))
        if choices is not None and value not in choices:
            raise ConfigError(f'{prefix}.{key} must be one of {list(choices)}, got {value!r}')


def _build(section: str, name: str, build: Callable[[], Any]) -> Any:
    try:
        return build()
    except (ValueError, TypeError, ImportError, AttributeError, KeyError) as e:
        raise ConfigError(f'{section}.{name}: {e}'.splitlines()[0]) from e


def _time_kwargs(section: str, name: str, kwargs: Mapping[str, Any]) -> None:
    """Composer schedulers keep ``t_*`` arguments as strings until the first step: parse them now."""
    for key, value in kwargs.items():
        if key.startswith('t_'):
            try:
                Time.from_input(value, TimeUnit.EPOCH)
            except (ValueError, TypeError):
                raise ConfigError(f'{section}.{key} must be a time such as 100ba or 0.1dur, got {value!r}') from None


def check_registered_objects(cfg: Mapping[str, Any]) -> None:
    """Builds the optimizer (on a dummy parameter), scheduler, algorithms, callbacks and loggers of ``cfg`` and
    discards them, so a wrong value fails now, named, instead of after the models have loaded."""
    quiet = logging.getLogger('composer')
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # building a callback may warn about things that only matter in a run
    try:
        if cfg.get('optimizer') is not None:
            kwargs = {k: v for k, v in cfg['optimizer'].items() if k != 'name'}
            name = cfg['optimizer']['name']
            _check_typed_kwargs('optimizer', name, OPTIMIZERS[name], kwargs)
            _build('optimizer', name, lambda: OPTIMIZERS[name]([torch.nn.Parameter(torch.zeros(1))], **kwargs))
        if cfg.get('scheduler') is not None:
            kwargs = {k: v for k, v in cfg['scheduler'].items() if k != 'name'}
            name = cfg['scheduler']['name']
            _time_kwargs('scheduler', name, kwargs)
            _check_typed_kwargs('scheduler', name, SCHEDULERS[name], kwargs)
            _build('scheduler', name, lambda: SCHEDULERS[name](**kwargs))
        for section, table in (('algorithms', ALGORITHMS), ('callbacks', CALLBACKS), ('loggers', LOGGERS)):
            for name, kwargs in (cfg.get(section) or {}).items():
                kwargs = dict(kwargs or {})
                if section == 'loggers' and name in _SERVICE_LOGGERS:
                    if importlib.util.find_spec(_SERVICE_LOGGERS[name]) is None:
                        raise ConfigError(f'loggers.{name}: the {name} package is not installed (pip install '
                                          f'"composer-kd[{name}]")')
                    continue
                if section == 'callbacks' and name in ('early_stopper', 'threshold_stopper'):
                    kwargs.setdefault('comp', 'lt')  # both filled in by the builder; checked separately
                    kwargs.setdefault('dataloader_label', 'eval')
                _check_typed_kwargs(section, name, table[name], kwargs)
                _build(section, name, lambda: table[name](**kwargs))
    finally:
        quiet.setLevel(level)

"""Reading a YAML config: a file or a shipped recipe, OmegaConf ``variables`` and interpolation, and dot-list
overrides — each failure one line naming the file, the line or the override.

The recipes ship inside the package (``composer_kd/yamls``; a clone also links them as ``yamls/``) and are found
with ``importlib.resources``, so a wheel install runs them by name: ``composer-kd train tiny-cpu``.
"""

import os
from importlib import resources
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from composer_kd.errors import ConfigError

__all__ = ['read_yaml', 'recipe_path', 'resolve_config_path', 'shipped_recipes']


def _root() -> Path:
    return Path(str(resources.files('composer_kd') / 'yamls'))


def shipped_recipes() -> list[str]:
    """Names of the shipped recipes, e.g. ``tiny-cpu`` and ``quickstart/student``."""
    root = _root()
    return sorted(str(p.relative_to(root).with_suffix('')) for p in root.rglob('*.yaml'))


def recipe_path(name: str) -> Path:
    """The file of shipped recipe ``name`` (``tiny-cpu``, ``quickstart/teacher``; ``.yaml`` optional)."""
    name = name[:-len('.yaml')] if name.endswith('.yaml') else name
    path = _root() / f'{name}.yaml'
    if not path.is_file():
        raise FileNotFoundError(f'no shipped recipe {name!r}; shipped: {shipped_recipes()}')
    return path


def resolve_config_path(path: str) -> str:
    """``path`` if it is a file, else the shipped recipe it names (``tiny-cpu``, ``yamls/tiny-cpu.yaml``), else
    ``path`` unchanged (the caller reports it missing)."""
    if os.path.isfile(path):
        return path
    name = path[len('yamls/'):] if path.startswith('yamls/') else path
    try:
        return str(recipe_path(name))
    except FileNotFoundError:
        return path


def read_yaml(path: str, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """A YAML config with ``key=value`` overrides applied and ``${variables.x}`` resolved; ``variables`` dropped.

    Raises:
        ConfigError: for a missing or unreadable file, a malformed override or a failed interpolation.
    """
    path = resolve_config_path(path)
    if not os.path.isfile(path):
        raise ConfigError(f'config file not found: {path} (shipped recipes, usable by name: '
                          f'{", ".join(shipped_recipes())})')
    try:
        cfg = OmegaConf.load(path)
        for item in overrides:
            if '=' not in item:
                raise ConfigError(f'override {item!r} must look like key=value (e.g. optimizer.lr=1e-4)')
            # One at a time through update, not one merge: a merge cannot reach into lists (model.teachers.1.weight).
            key = item.split('=', 1)[0]
            OmegaConf.update(cfg, key, OmegaConf.select(OmegaConf.from_dotlist([item]), key), force_add=True)
        resolved = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        raise ConfigError(f'{path}: {str(e).splitlines()[0]}') from e
    except ConfigError:
        raise
    except Exception as e:  # yaml parse errors come from several libraries
        mark = getattr(e, 'problem_mark', None)
        if mark is None and not type(e).__module__.startswith('yaml'):
            raise  # not a parse error: a bug keeps its traceback
        where = f' (line {mark.line + 1}, column {mark.column + 1})' if mark is not None else ''
        problem = getattr(e, 'problem', None) or str(e).splitlines()[0]
        raise ConfigError(f'{path}: cannot parse YAML{where}: {problem}') from e
    if not isinstance(resolved, dict):
        raise ConfigError(f'{path}: a run config must be a mapping of keys, got {type(resolved).__name__}')
    resolved.pop('variables', None)
    return resolved

"""The recipes shipped inside the package (``composer_kd/yamls``; a clone also links them as ``yamls/``), found
with ``importlib.resources`` so a wheel install runs them: ``composer-kd train tiny-cpu``."""

import os
from importlib import resources
from pathlib import Path

__all__ = ['recipe_path', 'resolve_config_path', 'shipped_recipes']


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

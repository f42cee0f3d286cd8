"""Re-exports that load on first use (PEP 562): a package's ``__getattr__`` and ``__dir__`` from a fixed table,
so importing the package does not import what its public names need (torch, Composer, Streaming)."""

import importlib
from typing import Any, Callable

__all__ = ['lazy_exports']


def lazy_exports(namespace: dict[str, Any],
                 exports: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for the package whose ``globals()`` is ``namespace``.

    Args:
        namespace (dict[str, Any]): the package's ``globals()``; a name is cached there once loaded.
        exports (dict[str, str]): public name → the module that defines it (only these modules are imported); a
            name may also be ``module:attribute``, the attribute of that module.
    """

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f'module {namespace["__name__"]!r} has no attribute {name!r}')
        value = getattr(importlib.import_module(exports[name]), name.rpartition(':')[2])
        namespace[name] = value  # later lookups skip __getattr__
        return value

    def __dir__() -> list[str]:
        return sorted([*namespace, *exports])

    return __getattr__, __dir__

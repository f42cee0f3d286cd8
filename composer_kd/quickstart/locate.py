"""Where a notebook finds the quickstart's output, wherever Jupyter was started.

Jupyter starts kernels in the notebook's folder (``notebooks/``) or wherever the server was launched; a relative
``quickstart-out`` would then start a second, fresh quickstart there. The folders resolve, in order: the
notebook's parameter cell, the ``QUICKSTART_OUT`` / ``NOTEBOOK_OUT`` environment variables, then the first
folder from the current one upwards that holds a quickstart output or is the composer-kd repository root, and
last the current folder.
"""

import os
from pathlib import Path
from typing import Optional

__all__ = ['notebook_folders', 'quickstart_base']


def _is_repo_root(folder: Path) -> bool:
    pyproject = folder / 'pyproject.toml'
    return pyproject.is_file() and 'name = "composer-kd"' in pyproject.read_text(errors='replace')


def quickstart_base(start: Path, name: str) -> Path:
    """The folder that holds (or will hold) the quickstart output ``name``: ``start`` or the nearest parent that
    already holds ``name`` or is the repository root; ``start`` when there is none."""
    for folder in (start, *start.parents):
        if (folder / name).is_dir() or _is_repo_root(folder):
            return folder
    return start


def notebook_folders(quickstart_out: Optional[str] = None, notebook_out: Optional[str] = None, fast: bool = False,
                     start: Optional[Path] = None) -> tuple[Path, Path]:
    """The quickstart's output folder and the notebook's own output folder, both absolute.

    Args:
        quickstart_out (str, optional): from the notebook's parameter cell; wins over the environment.
        notebook_out (str, optional): likewise for what the notebook writes.
        fast (bool): ``--fast`` sizes (default folder ``quickstart-out-fast``).
        start (Path, optional): where to search from (default: the current folder).
    """
    start = (start or Path.cwd()).resolve()
    name = 'quickstart-out-fast' if fast else 'quickstart-out'
    base = quickstart_base(start, name)
    out = quickstart_out or os.environ.get('QUICKSTART_OUT') or str(base / name)
    own = notebook_out or os.environ.get('NOTEBOOK_OUT') or str(base / 'notebook-out')
    return Path(out).expanduser().resolve(), Path(own).expanduser().resolve()

"""Write a folder of outputs all at once: a failed or interrupted writer leaves no partial folder behind."""

import contextlib
import os
import shutil
import tempfile
from typing import Iterator

__all__ = ['staged_folder']


@contextlib.contextmanager
def staged_folder(out: str) -> Iterator[str]:
    """Yields an empty folder next to ``out``; on success it replaces ``out``, on any failure it is removed."""
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f'.{os.path.basename(out)}.partial-', dir=parent)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if os.path.isdir(out):
        shutil.rmtree(out)
    os.rename(staging, out)

"""Giving back what a ``StreamingDataset`` holds in this process once it is no longer used.

Streaming keeps every shared-memory block a dataset makes or attaches to — its own, and one for every other
live dataset it probes while choosing a name — open until the process exits (they are registered with
``atexit``). A long-lived process that builds many datasets one after another (the quickstart's stages, a
notebook, a test session) therefore accumulates descriptors, more with each dataset, and passes the common
soft limit of 1,024 open files. ``release_shared_memory`` frees a finished dataset's blocks now, so later
datasets neither probe nor keep them; ``raise_open_file_limit`` lifts the soft limit to the hard one.
"""

import atexit
import resource
from typing import Any

from streaming import StreamingDataset
from streaming.base.shared.memory import SharedMemory

__all__ = ['raise_open_file_limit', 'release_shared_memory']

_WANTED = 1 << 16


def raise_open_file_limit() -> int:
    """Raises this process's soft limit of open files towards 65,536 (never past the hard limit); returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = _WANTED if hard == resource.RLIM_INFINITY else min(_WANTED, hard)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        return wanted
    return soft


def _shared_memories(obj: Any, depth: int, seen: set[int]) -> list[SharedMemory]:
    """The Streaming ``SharedMemory`` objects reachable from ``obj``'s attributes (a few levels deep)."""
    if id(obj) in seen or depth < 0:
        return []
    seen.add(id(obj))
    if isinstance(obj, SharedMemory):
        return [obj]
    found = []
    for value in (vars(obj).values() if hasattr(obj, '__dict__') else ()):
        found += _shared_memories(value, depth - 1, seen)
    return found


def release_shared_memory(dataset: StreamingDataset) -> int:
    """Closes (and, where this process made them, unlinks) the dataset's shared memory now rather than at exit.

    The dataset must not be read afterwards; a second call does nothing. Returns the number of blocks released.
    """
    if getattr(dataset, '_composer_kd_released', False):
        return 0
    blocks = _shared_memories(dataset, 3, set())
    for block in blocks:
        atexit.unregister(block.cleanup)
        block.cleanup()
    dataset._composer_kd_released = True
    return len(blocks)

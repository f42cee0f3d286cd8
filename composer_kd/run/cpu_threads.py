"""Ranks on one CPU node share its cores.

``composer -n N`` starts N ranks on the node, and each would size its intra-op thread pool to all of the node's
cores: N-fold oversubscription, which slows every step (2 ranks on 2 cores, 24 steps of ``tiny-cpu`` with its
start-up: 21.7 s with 2 threads a rank, 17.1 s with 1; 2026-12-03). ``torchrun`` sets ``OMP_NUM_THREADS=1`` for the
same reason; here each rank gets its share of the cores the process may run on, unless ``OMP_NUM_THREADS`` is set.
"""

import logging
import os
from typing import Optional

import torch

__all__ = ['share_cpu_cores', 'threads_per_rank']

log = logging.getLogger(__name__)


def threads_per_rank(cores: int, local_ranks: int) -> int:
    """Each of ``local_ranks`` ranks' share of ``cores`` (at least one thread)."""
    return max(1, cores // max(1, local_ranks))


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # what a container or taskset allows, not the machine's count
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def share_cpu_cores() -> Optional[int]:
    """Sets this rank's intra-op threads to its share of the node's cores when several ranks run on the node
    (``LOCAL_WORLD_SIZE`` > 1) and ``OMP_NUM_THREADS`` does not say otherwise; call it on CPU runs only.

    Returns:
        int | None: the threads set, or ``None`` when nothing was changed.
    """
    local_ranks = int(os.environ.get('LOCAL_WORLD_SIZE', '1'))
    if local_ranks <= 1 or 'OMP_NUM_THREADS' in os.environ:
        return None
    threads = threads_per_rank(_usable_cores(), local_ranks)
    torch.set_num_threads(threads)
    log.info('%d ranks on this node: %d intra-op thread(s) each (set OMP_NUM_THREADS to choose)', local_ranks, threads)
    return threads

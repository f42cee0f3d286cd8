"""SIGTERM — what schedulers send before preemption — ends the run at the next step boundary with a
checkpoint, and the process exits 0; the same command with ``autoresume: true`` resumes from it.

Neither Composer nor Python turns SIGTERM into a save (the process dies with 143). The handler only sets a
flag; at ``BATCH_END`` the ranks agree (one all-reduce) and stop together with ``state.stop_training()``.
Composer's ``CheckpointSaver`` saves at the end of training, so the checkpoint of that batch is written by
Composer itself, with its usual name and ``latest`` link.
"""

import logging
import signal
import threading
from typing import Any, Optional

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist

__all__ = ['StopOnSigterm']

log = logging.getLogger(__name__)


class StopOnSigterm(Callback):
    """Stops training at the next batch boundary after SIGTERM (the checkpoint follows from ``save_folder``)."""

    def __init__(self) -> None:
        self.requested = False
        self.stopped_at: Optional[int] = None
        self._previous: Any = None

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self.requested = True

    def fit_start(self, state: State, logger: Logger) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

    def batch_end(self, state: State, logger: Logger) -> None:
        flag = state.device.tensor_to_device(torch.tensor([1.0 if self.requested else 0.0]))
        dist.all_reduce(flag, reduce_operation='MAX')
        if flag.item() > 0:
            self.stopped_at = int(state.timestamp.batch)
            log.warning('SIGTERM: stopping after batch %d; the checkpoint of this batch is saved if save_folder is '
                        'set, and the same command with autoresume: true resumes from it', self.stopped_at)
            state.stop_training()

    def fit_end(self, state: State, logger: Logger) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

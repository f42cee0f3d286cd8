"""Periodic garbage collection (LLM Foundry's ``scheduled_gc``), which Composer does not ship.

Python's automatic collector pauses ranks at different moments, which stalls collectives on every other
rank; collecting on a fixed batch schedule makes all ranks pause together.
"""

import gc
from typing import Optional

from composer.core import Callback, State
from composer.loggers import Logger

__all__ = ['ScheduledGarbageCollector']


class ScheduledGarbageCollector(Callback):
    """Disables automatic GC during ``fit`` and collects every ``batch_interval`` batches and around eval.

    Composer runs no event when ``fit`` raises, so GC would stay off in a notebook after a failed run: ``close``
    (``Trainer.close()``, which ``composer_kd.run.train.train`` calls when ``fit`` raises, and Composer's exit hook)
    turns it back on.

    Args:
        batch_interval (int): collect after every this many batches. Default: ``100``.
        generation (int): oldest generation collected (0–2). Default: ``1``.
        eval_keep_disabled (bool): leave GC disabled during evaluation too. Default: ``False``.
    """

    def __init__(self, batch_interval: int = 100, generation: int = 1, eval_keep_disabled: bool = False) -> None:
        if batch_interval <= 0:
            raise ValueError(f'batch_interval must be a positive integer, got {batch_interval!r}')
        if generation not in (0, 1, 2):
            raise ValueError(f'generation must be 0, 1 or 2, got {generation!r}')
        self.batch_interval = batch_interval
        self.generation = generation
        self.eval_keep_disabled = eval_keep_disabled
        self._was_enabled: Optional[bool] = None

    def fit_start(self, state: State, logger: Logger) -> None:
        self._was_enabled = gc.isenabled()
        gc.disable()

    def fit_end(self, state: State, logger: Logger) -> None:
        gc.collect(self.generation)
        self._restore()

    def close(self, state: State, logger: Logger) -> None:
        self._restore()

    def _restore(self) -> None:
        if self._was_enabled:
            gc.enable()
        self._was_enabled = None

    def batch_end(self, state: State, logger: Logger) -> None:
        if int(state.timestamp.batch) % self.batch_interval == 0:
            gc.collect(self.generation)

    def eval_start(self, state: State, logger: Logger) -> None:
        gc.collect(self.generation)
        if not self.eval_keep_disabled:
            gc.enable()

    def eval_end(self, state: State, logger: Logger) -> None:
        if not self.eval_keep_disabled:
            gc.disable()
        gc.collect(self.generation)

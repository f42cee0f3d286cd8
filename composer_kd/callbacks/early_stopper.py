"""``StatefulEarlyStopper``: Composer's ``EarlyStopper`` whose state is part of the checkpoint.

Composer's own keeps its best value and when it occurred in memory only, and ``State.stop_training`` shortens
``max_duration``, which is not checkpointed either: an early-stopped run that autoresumes trains on to the YAML's
``max_duration``, and a run interrupted mid-patience starts counting again. This subclass saves the best value,
its time and the batch it stopped at; a resumed run keeps its count, and a stopped one stays stopped.
"""

from typing import Any, Callable

import torch
from composer.callbacks import EarlyStopper
from composer.core import State, Time, Timestamp
from composer.loggers import Logger

__all__ = ['StatefulEarlyStopper']


class StatefulEarlyStopper(EarlyStopper):
    """``EarlyStopper`` (same arguments: ``monitor``, ``dataloader_label``, ``comp``, ``min_delta``, ``patience``)
    with ``state_dict``/``load_state_dict``; logs ``early_stopper/best`` after each check and
    ``early_stopper/stopped_at_batch`` once it has stopped the run."""

    def __init__(self,
                 monitor: str,
                 dataloader_label: str,
                 comp: str | Callable[[Any, Any], Any] | None = None,
                 min_delta: float = 0.0,
                 patience: int | str | Time = 1) -> None:
        super().__init__(monitor, dataloader_label, comp=comp, min_delta=min_delta, patience=patience)
        self.stopped_at: int | None = None

    def _update_stopper_state(self, state: State) -> None:
        # Composer's private step of EarlyStopper (tests/test_dependency_internals.py names it if an upgrade moves it).
        duration_before = state.max_duration
        super()._update_stopper_state(state)
        if state.max_duration != duration_before:  # it called state.stop_training()
            self.stopped_at = int(state.timestamp.batch)

    def _log(self, logger: Logger) -> None:
        if self.best is not None:
            logger.log_metrics({'early_stopper/best': float(self.best)})
        if self.stopped_at is not None:
            logger.log_metrics({'early_stopper/stopped_at_batch': self.stopped_at})

    def eval_end(self, state: State, logger: Logger) -> None:
        super().eval_end(state, logger)
        self._log(logger)

    def epoch_end(self, state: State, logger: Logger) -> None:
        super().epoch_end(state, logger)
        self._log(logger)

    def fit_start(self, state: State, logger: Logger) -> None:
        if self.stopped_at is not None:  # stopped before the checkpoint this run resumed from
            state.stop_training()

    def state_dict(self) -> dict[str, Any]:
        occurred = self.best_occurred
        return {
            'monitor': self.monitor,
            'best': None if self.best is None else float(self.best),
            'best_occurred': None if occurred is None else {
                'epoch': int(occurred.epoch), 'batch': int(occurred.batch), 'sample': int(occurred.sample),
                'token': int(occurred.token)
            },
            'stopped_at': self.stopped_at,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get('monitor') != self.monitor:  # another metric's record says nothing about this one
            return
        self.best = None if state['best'] is None else torch.tensor(state['best'])
        self.best_occurred = None if state['best_occurred'] is None else Timestamp(**state['best_occurred'])
        self.stopped_at = state['stopped_at']

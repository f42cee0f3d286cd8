"""Stops on — or skips — a training batch whose loss is NaN or infinite, before the optimizer applies it.

Composer's ``NaNMonitor`` raises after the step has already written NaN into the weights and names neither the
rank nor the samples. This guard wraps the optimizer's ``step``: each microbatch's loss terms are kept (no host
sync) at ``AFTER_LOSS``; at the step, one all-reduce over ranks decides, so every rank stops or skips together
and the replicas never diverge.
"""

import logging
from typing import Any, Callable, Optional

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist

from composer_kd.errors import TrainingFault

__all__ = ['NonFiniteGuard', 'ON_NONFINITE']

log = logging.getLogger(__name__)

ON_NONFINITE = ('raise', 'skip_batch')


class NonFiniteGuard(Callback):
    """Checks every training batch's loss before the optimizer step.

    Args:
        action (str): ``'raise'`` stops the run with a ``TrainingFault`` naming the step, the rank(s), the
            sample ids and the loss terms; ``'skip_batch'`` drops the batch's gradients, does not step, and
            logs the running count as ``nonfinite/skipped_batches`` (kept in the checkpoint). Default: ``'raise'``.
    """

    def __init__(self, action: str = 'raise') -> None:
        if action not in ON_NONFINITE:
            raise ValueError(f'on_nonfinite must be one of {list(ON_NONFINITE)}, got {action!r}')
        self.action = action
        self.skipped = 0
        self._records: list[tuple[torch.Tensor, dict[str, torch.Tensor], Optional[torch.Tensor]]] = []
        self._logger: Optional[Logger] = None
        self._wrapped: set[int] = set()
        self._bad_ranks: list[int] = []

    def state_dict(self) -> dict[str, Any]:
        return {'skipped': self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped = int(state.get('skipped', 0))

    def fit_start(self, state: State, logger: Logger) -> None:
        self._logger = logger
        for optimizer in state.optimizers:
            if id(optimizer) not in self._wrapped:
                self._wrapped.add(id(optimizer))
                optimizer.step = self._guarded(state, optimizer, optimizer.step)  # type: ignore[method-assign]

    def after_loss(self, state: State, logger: Logger) -> None:
        loss = state.loss
        terms = loss if isinstance(loss, dict) else {'total': loss}
        terms = {k: v.detach().float().clone().reshape(-1)[:1] for k, v in terms.items() if torch.is_tensor(v)}
        bad = ~torch.isfinite(torch.cat(list(terms.values()))).all()
        ids = state.batch.get('sample_id') if isinstance(state.batch, dict) else None
        self._records.append((bad, terms, None if ids is None else ids.detach()))

    def _guarded(self, state: State, optimizer: torch.optim.Optimizer, step: Callable[..., Any]) -> Callable[..., Any]:

        def guarded_step(closure: Optional[Callable[[], Any]] = None, **kwargs: Any) -> Any:
            result = closure() if closure is not None else None  # Composer runs the microbatches in the closure
            records, self._records = self._records, []
            if not self._any_rank_bad(records, state):
                step(**kwargs)
                return result
            self._handle(state, optimizer, records)
            return result

        return guarded_step

    def _any_rank_bad(self, records: list, state: State) -> bool:
        mine = torch.stack([bad for bad, _, _ in records]).any() if records else torch.tensor(False)
        flags = torch.zeros(dist.get_world_size(), device=mine.device)
        flags[dist.get_global_rank()] = mine.float()
        dist.all_reduce(flags, reduce_operation='SUM')
        self._bad_ranks = [r for r, f in enumerate(flags.tolist()) if f > 0]
        return bool(self._bad_ranks)

    def _handle(self, state: State, optimizer: torch.optim.Optimizer, records: list) -> None:
        step_number = int(state.timestamp.batch) + 1
        rank = dist.get_global_rank()
        bad = [(terms, ids) for flag, terms, ids in records if bool(flag)]
        if bad:
            ids = sorted(int(i) for _, ids in bad if ids is not None for i in ids.tolist())
            terms = {k: float(v) for k, v in bad[0][0].items()}
            where = f'rank {rank}, sample ids {ids if ids else "unknown"}, loss terms {terms}'
            hint = ' (the distillation term: check the teacher\'s outputs)' if (
                'kd' in terms and not torch.isfinite(torch.tensor(terms['kd'])) and
                torch.isfinite(torch.tensor(terms.get('ce', 0.0)))) else ''
        else:
            where, hint = f'on rank(s) {self._bad_ranks}, not on rank {rank}', ''
        if self.action == 'raise':
            raise TrainingFault(f'non-finite loss at step {step_number}: {where}{hint}; nothing was applied to the '
                                'student (set on_nonfinite: skip_batch to skip such batches)')
        optimizer.zero_grad(set_to_none=True)
        self.skipped += 1
        log.warning('skipped batch %d (non-finite loss: %s)', step_number, where)
        if self._logger is not None:
            self._logger.log_metrics({'nonfinite/skipped_batches': self.skipped})

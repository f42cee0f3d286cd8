"""Teacher–student metrics, summed over tokens and reduced across ranks like Composer's language metrics.

Names matter: Composer's ``EarlyStopper`` picks ``less`` as the better direction when the monitored name
contains "loss", so ``TeacherDivergenceLoss`` is minimised and ``TeacherTop1Agreement`` maximised without a
``comp`` argument.
"""

from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics import Metric

from composer_kd.divergences import DIVERGENCES

__all__ = ['TeacherDivergenceLoss', 'TeacherTop1Agreement']


class _TokenMeanMetric(Metric):
    """Mean of a per-token quantity over the tokens whose target is not ``ignore_index``.

    ``update`` takes student and teacher logits ``(B, T, V)`` and already-shifted targets ``(B, T)``.
    """

    full_state_update = False

    def __init__(self, ignore_index: int = -100, dist_sync_on_step: bool = False) -> None:
        super().__init__(dist_sync_on_step=dist_sync_on_step)
        self.ignore_index = ignore_index
        self.add_state('sum', default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx='sum')
        self.add_state('count', default=torch.tensor(0, dtype=torch.long), dist_reduce_fx='sum')

    def _per_token(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def update(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor) -> None:
        mask = targets != self.ignore_index
        values = self._per_token(student_logits[mask].float(), teacher_logits[mask].float())
        self.sum += values.sum().to(torch.float64)
        self.count += mask.sum()

    def compute(self) -> torch.Tensor:
        return (self.sum / self.count.clamp(min=1)).float()


class TeacherDivergenceLoss(_TokenMeanMetric):
    """Per-token divergence D(teacher‖student) at the distillation temperature (the unscaled ``kd`` term).

    Args:
        divergence (str): a name from :data:`composer_kd.divergences.DIVERGENCES`. Default: ``'forward_kl'``.
        temperature (float): softmax temperature of both distributions. Default: ``1.0``.
        divergence_kwargs (dict, optional): ``beta`` or ``lam`` for the divergences that take them.
        ignore_index (int): target value that is not scored. Default: ``-100``.
    """

    def __init__(self,
                 divergence: str = 'forward_kl',
                 temperature: float = 1.0,
                 divergence_kwargs: dict[str, Any] | None = None,
                 ignore_index: int = -100,
                 dist_sync_on_step: bool = False) -> None:
        super().__init__(ignore_index=ignore_index, dist_sync_on_step=dist_sync_on_step)
        self.divergence_fn = DIVERGENCES[divergence][0]
        self.temperature = temperature
        self.divergence_kwargs = dict(divergence_kwargs or {})

    def _per_token(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        p_log = F.log_softmax(teacher / self.temperature, dim=-1)
        q_log = F.log_softmax(student / self.temperature, dim=-1)
        return self.divergence_fn(p_log, q_log, **self.divergence_kwargs)


class TeacherTop1Agreement(_TokenMeanMetric):
    """Fraction of scored tokens where the student's argmax equals the teacher's argmax."""

    def _per_token(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return (student.argmax(dim=-1) == teacher.argmax(dim=-1)).float()

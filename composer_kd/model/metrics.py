"""Token-level metrics on the chunked loss path, summed over tokens and reduced across ranks.

Composer's ``LanguageCrossEntropy`` takes a full ``(B·T, V)`` log-softmax per update — at a 128k vocabulary
as large as the logits themselves, every training microbatch (Composer updates train metrics after each
one). The classes here keep Composer's names, states and ``compute`` but update through
``distillation_loss`` under ``no_grad``, chunk by chunk.

Names matter: Composer's ``EarlyStopper`` picks ``less`` as the better direction when the monitored name
contains "loss", so ``TeacherDivergenceLoss`` is minimised and ``TeacherTop1Agreement`` maximised without a
``comp`` argument.
"""

from typing import Any, NamedTuple, Optional, Union

import torch
from composer.metrics import LanguageCrossEntropy, LanguagePerplexity
from torchmetrics import Metric

from composer_kd.losses import TopKTeacher, distillation_loss, topk_distillation_loss

__all__ = [
    'ChunkedCrossEntropyUpdate', 'ChunkedLanguageCrossEntropy', 'ChunkedLanguagePerplexity', 'TeacherDivergenceLoss',
    'TeacherTop1Agreement', 'TokenSums', 'update_from_fused_outputs'
]


Teacher = Union[torch.Tensor, TopKTeacher]  # dense logits (B, T, V), or a precomputed top-k teacher


def _token_sums(student_logits: torch.Tensor, teacher: Optional[Teacher], targets: torch.Tensor, ignore_index: int,
                **loss_kwargs: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(CE sum, divergence sum, token count) over targets ``(B, T)`` already aligned with the logits."""
    with torch.no_grad():
        if isinstance(teacher, TopKTeacher):
            out = topk_distillation_loss(student_logits, teacher.ids, teacher.logprobs, targets, shift_labels=False,
                                         ignore_index=ignore_index, teacher_rest_logprob=teacher.rest_logprob,
                                         **loss_kwargs)
        else:
            out = distillation_loss(student_logits, teacher, targets, shift_labels=False, ignore_index=ignore_index,
                                    **loss_kwargs)
    count = (targets != ignore_index).sum()
    return out['ce'] * count, out['kd'] * count, count


class TokenSums(NamedTuple):
    """A per-token quantity (cross-entropy, divergence, top-1 agreement) summed over a batch's scored tokens, and
    their count (both scalar tensors): what a fused-head loss gives the metrics instead of logits."""
    value_sum: torch.Tensor
    count: torch.Tensor


class ChunkedCrossEntropyUpdate:
    """``update(logits (B, T, V), targets (B, T))`` for Composer's language metrics, on the chunked path."""

    ignore_index: int

    def update(self, output: Union[torch.Tensor, 'TokenSums'], target: Optional[torch.Tensor]) -> None:
        """``output``: logits ``(B, T, V)``, or the ``TokenSums`` a fused-head loss gives instead (then ``target`` is
        not used)."""
        if isinstance(output, TokenSums):
            ce_sum, count = output
        else:
            ce_sum, _, count = _token_sums(output, None, target, self.ignore_index, alpha=1.0)
        self.sum_loss += ce_sum.to(self.sum_loss.dtype)  # type: ignore[attr-defined]
        self.total_items += count  # type: ignore[attr-defined]


class ChunkedLanguageCrossEntropy(ChunkedCrossEntropyUpdate, LanguageCrossEntropy):
    """Composer's ``LanguageCrossEntropy`` (mean token CE), updated without a full-vocabulary copy."""


class ChunkedLanguagePerplexity(ChunkedCrossEntropyUpdate, LanguagePerplexity):
    """Composer's ``LanguagePerplexity`` (exp of the mean token CE), updated without a full-vocabulary copy."""


class _TeacherTokenMetric(Metric):
    """Mean of a per-token teacher–student quantity over targets that are not ``ignore_index``.

    ``update`` takes student logits ``(B, T, V)``, the teacher (dense logits ``(B, T, V)`` or a ``TopKTeacher``)
    and targets ``(B, T)`` aligned with them.
    """

    full_state_update = False

    def __init__(self, ignore_index: int = -100, dist_sync_on_step: bool = False) -> None:
        super().__init__(dist_sync_on_step=dist_sync_on_step)
        self.ignore_index = ignore_index
        self.add_state('sum', default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx='sum')
        self.add_state('count', default=torch.tensor(0, dtype=torch.long), dist_reduce_fx='sum')

    def _add(self, sums: TokenSums) -> None:
        self.sum += sums.value_sum.to(torch.float64)
        self.count += sums.count

    def compute(self) -> torch.Tensor:
        return (self.sum / self.count.clamp(min=1)).float()


class TeacherDivergenceLoss(_TeacherTokenMetric):
    """Per-token divergence D(teacher‖student) at the distillation temperature (the unscaled ``kd`` term; over
    the top-k buckets for a precomputed teacher).

    Args:
        divergence (str): a name from :data:`composer_kd.divergences.DIVERGENCES`. Default: ``'forward_kl'``.
        temperature (float): softmax temperature of both distributions. Default: ``1.0``.
        divergence_kwargs (dict, optional): ``beta`` or ``lam`` for the divergences that take them.
        ignore_index (int): target value that is not scored. Default: ``-100``.
    """

    def __init__(self,
                 divergence: str = 'forward_kl',
                 temperature: float = 1.0,
                 divergence_kwargs: Optional[dict[str, Any]] = None,
                 ignore_index: int = -100,
                 dist_sync_on_step: bool = False) -> None:
        super().__init__(ignore_index=ignore_index, dist_sync_on_step=dist_sync_on_step)
        self.loss_kwargs = {'alpha': 0.0, 'temperature': temperature, 'divergence': divergence,
                            **(divergence_kwargs or {})}

    def update(self, student_logits: Union[torch.Tensor, TokenSums], teacher: Optional[Teacher],
               targets: Optional[torch.Tensor]) -> None:
        """Student logits, the teacher and targets; or the ``TokenSums`` of the divergence from a fused head."""
        if not isinstance(student_logits, TokenSums):
            _, kd_sum, count = _token_sums(student_logits, teacher, targets, self.ignore_index, **self.loss_kwargs)
            student_logits = TokenSums(kd_sum, count)
        self._add(student_logits)


class TeacherTop1Agreement(_TeacherTokenMetric):
    """Fraction of scored tokens where the student's argmax equals the teacher's argmax (the first top-k id of
    a precomputed teacher)."""

    def update(self, student_logits: Union[torch.Tensor, TokenSums], teacher: Optional[Teacher],
               targets: Optional[torch.Tensor]) -> None:
        """Student logits, the teacher and targets; or the ``TokenSums`` of agreeing tokens from a fused head."""
        if not isinstance(student_logits, TokenSums):
            mask = targets != self.ignore_index
            teacher_top1 = teacher.ids[..., 0] if isinstance(teacher, TopKTeacher) else teacher.argmax(dim=-1)
            agree = student_logits.argmax(dim=-1) == teacher_top1
            student_logits = TokenSums((agree & mask).sum(), mask.sum())
        self._add(student_logits)


def update_from_fused_outputs(metric: Metric, outputs: dict[str, Any], tokens: torch.Tensor) -> None:
    """Updates a metric from the outputs of a fused-head forward (``DistillationModel(fused_head=True)``): a
    training step's ``loss_terms`` (total, ce, kd means) or an evaluation's ``token_sums`` (CE, divergence, top-1
    agreement sums, tokens). ``tokens``: the batch's scored tokens.

    Raises:
        ValueError: for a metric these outputs cannot update.
    """
    if outputs.get('loss_terms') is not None:  # training: CE from the loss (Composer's train metrics are CE only)
        if not isinstance(metric, ChunkedCrossEntropyUpdate):
            raise ValueError(f'{type(metric).__name__} needs logits, which a fused_head training step never has')
        metric.update(TokenSums(outputs['loss_terms'].view(3)[1].detach() * tokens.clamp(min=1), tokens), None)
        return
    ce, kd, top1, count = outputs['token_sums'].view(4).unbind()
    count = count.long()
    if isinstance(metric, ChunkedCrossEntropyUpdate):
        metric.update(TokenSums(ce, count), None)
    elif not outputs['has_teacher']:
        raise ValueError(f'{type(metric).__name__} needs the teacher: evaluate on data precomputed by the same '
                         'teacher (precompute-teacher), or leave the teacher metrics out')
    elif isinstance(metric, (TeacherDivergenceLoss, TeacherTop1Agreement)):
        metric.update(TokenSums(kd if isinstance(metric, TeacherDivergenceLoss) else top1, count), None, None)
    else:
        raise ValueError(f'{type(metric).__name__} needs logits, which a fused_head forward never has')

"""Statistics of a distillation batch for monitoring: entropies and top-1 agreement (chunk by chunk), and each
sample's own loss terms.

Shapes: B batch, T sequence length, V vocabulary, K precomputed teacher entries, N scored tokens, C rows of one
chunk.

Sums over the scored tokens (the positions the loss scores), so microbatches and ranks add up exactly and the
caller divides by ``tokens`` once.
"""

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F

from composer_kd.losses.arguments import scored_positions
from composer_kd.losses.chunked import default_chunk_elements
from composer_kd.losses.dense import distillation_loss
from composer_kd.losses.topk import TopKTeacher, topk_distillation_loss

__all__ = ['STAT_NAMES', 'distillation_stat_sums', 'per_sample_losses', 'rollout_stat_sums']

STAT_NAMES = ('student_entropy', 'teacher_entropy', 'top1_agreement')


def _entropy(log_p: torch.Tensor) -> torch.Tensor:
    return -(log_p.exp() * log_p.nan_to_num(neginf=0.0)).sum(-1)


@torch.no_grad()
def distillation_stat_sums(student_logits: torch.Tensor,
                           teacher: torch.Tensor | TopKTeacher | None,
                           labels: torch.Tensor,
                           ignore_index: int = -100,
                           chunk_elements: Optional[int] = None) -> dict[str, torch.Tensor]:
    """Sums over the N scored tokens of the student's and the teacher's entropy (nats, at temperature 1) and of
    top-1 agreement (student argmax = teacher argmax), plus ``tokens`` = N.

    Args:
        student_logits (Tensor): ``(B, T, V)``.
        teacher (Tensor | TopKTeacher, optional): dense logits ``(B, T, V)``, or a precomputed top-k (its entropy is
            then that of the K ids plus one bucket for the rest at temperature 1: a lower bound of the full
            entropy). ``None``: the student's entropy only.
        labels (Tensor): ``(B, T)``, shifted as in the loss (position t scored against ``labels[:, t+1]``).
        ignore_index (int): label value that is not scored. Default: ``-100``.
        chunk_elements (int, optional): rows × V upcast at a time. Default: as the loss.

    Returns:
        dict[str, Tensor]: float64 scalars ``tokens`` and each of ``STAT_NAMES`` (teacher ones only with a teacher).
    """
    mask = scored_positions(labels, ignore_index, True).flatten()
    vocab = student_logits.shape[-1]
    rows = student_logits.reshape(-1, vocab)  # views: rows are gathered chunk by chunk, never all at once
    dense = teacher.reshape(-1, vocab) if isinstance(teacher, torch.Tensor) else None
    if isinstance(teacher, TopKTeacher):
        top_ids, top_logprobs = (t.reshape(-1, t.shape[-1]) for t in teacher[:2])
    sums = {'tokens': mask.sum(dtype=torch.float64)}
    for name in STAT_NAMES if teacher is not None else STAT_NAMES[:1]:
        sums[name] = torch.zeros((), dtype=torch.float64, device=rows.device)
    chunk = max(1, (chunk_elements or default_chunk_elements(rows.device)) // vocab)
    for start in range(0, rows.shape[0], chunk):
        keep = mask[start:start + chunk]
        log_q = F.log_softmax(rows[start:start + chunk][keep].float(), dim=-1)
        sums['student_entropy'] += _entropy(log_q).sum(dtype=torch.float64)
        if dense is not None:
            log_p = F.log_softmax(dense[start:start + chunk][keep].float(), dim=-1)
            sums['teacher_entropy'] += _entropy(log_p).sum(dtype=torch.float64)
            sums['top1_agreement'] += (log_q.argmax(-1) == log_p.argmax(-1)).sum(dtype=torch.float64)
        elif teacher is not None:
            # At temperature 1 the rest bucket is 1 − Σ top-k (the recorded rest is at the loss's temperature).
            top = top_logprobs[start:start + chunk][keep].double()
            rest = (1.0 - top.exp().sum(-1)).clamp(min=0.0).log()
            sums['teacher_entropy'] += _entropy(torch.cat([top, rest[:, None]], dim=-1)).sum()
            top1 = top_ids[start:start + chunk][keep][:, 0].long()
            sums['top1_agreement'] += (log_q.argmax(-1) == top1).sum(dtype=torch.float64)
    return sums


@torch.no_grad()
def per_sample_losses(student_logits: torch.Tensor,
                      teacher: torch.Tensor | TopKTeacher | None,
                      labels: torch.Tensor,
                      ignore_index: int = -100,
                      **settings: Any) -> dict[str, torch.Tensor]:
    """Each sample's mean CE, mean KD and top-1 agreement over its scored tokens, by the same loss functions as
    the batch (``distillation_loss`` / ``topk_distillation_loss`` on that sample alone), so the per-sample
    values are the batch terms' parts.

    Args:
        student_logits (Tensor): ``(B, T, V)``.
        teacher (Tensor | TopKTeacher, optional): dense ``(B, T, V)`` logits or a precomputed top-k; ``None``:
            CE only (KD and agreement are NaN).
        labels (Tensor): ``(B, T)``.
        ignore_index (int): label value that is not scored. Default: ``-100``.
        **settings: ``temperature``, ``divergence`` and its keywords, as the loss has them.

    Returns:
        dict[str, Tensor]: ``(B,)`` float64 ``ce``, ``kd``, ``top1_agreement`` and ``tokens`` (scored tokens).
    """
    student = student_logits.detach()
    rows = student.shape[0]
    out = {name: torch.full((rows,), math.nan, dtype=torch.float64) for name in ('ce', 'kd', 'top1_agreement')}
    mask = scored_positions(labels, ignore_index, True)
    out['tokens'] = mask.sum(-1).double().cpu()
    for i in range(rows):
        one = slice(i, i + 1)
        if isinstance(teacher, TopKTeacher):
            rest = None if teacher.rest_logprob is None else teacher.rest_logprob[one]
            terms = topk_distillation_loss(student[one], teacher.ids[one], teacher.logprobs[one], labels[one],
                                           alpha=0.0, teacher_rest_logprob=rest, ignore_index=ignore_index,
                                           **settings)
            teacher_top1 = teacher.ids[i, :, 0].long()
        elif teacher is not None:
            terms = distillation_loss(student[one], teacher[one], labels[one], alpha=0.0, ignore_index=ignore_index,
                                      **settings)
            teacher_top1 = teacher[i].argmax(-1)
        else:
            terms = distillation_loss(student[one], None, labels[one], alpha=1.0, ignore_index=ignore_index)
            teacher_top1 = None
        out['ce'][i] = terms['ce'].double()
        if teacher_top1 is not None:
            out['kd'][i] = terms['kd'].double()
            scored = mask[i]
            agree = (student[i].argmax(-1) == teacher_top1)[scored]
            out['top1_agreement'][i] = agree.double().mean() if agree.numel() else math.nan
    return out


@torch.no_grad()
def rollout_stat_sums(student_logits: torch.Tensor, teacher_logits: Optional[torch.Tensor], labels: torch.Tensor,
                      sampler_logprobs: torch.Tensor, sampler_temperature: float, temperature: float,
                      ignore_index: int = -100, chunk_elements: Optional[int] = None) -> dict[str, torch.Tensor]:
    """Sums over the scored (sampled) tokens of a rollout batch: the teacher's log-probability of each sampled token
    at the distillation ``temperature``, and the gap between the log-probability the sampler drew it with and the
    training forward's at ``sampler_temperature`` (signed and absolute), plus ``tokens``.

    Args:
        student_logits (Tensor): ``(B, T, V)`` of the training forward. teacher_logits (Tensor, optional): ``(B, T,
            V)`` (dense or an ensemble's; None: no teacher sums).
        labels (Tensor): ``(B, T)``, the sampled tokens scored (shifted as in the loss).
        sampler_logprobs (Tensor): ``(B, T)`` the sampler's log-probability of the token at each position.
        sampler_temperature (float): the temperature the tokens were sampled at. temperature (float): the loss's.

    Returns:
        dict[str, Tensor]: float64 scalars ``tokens``, ``sampler_gap``, ``sampler_abs_gap`` and, with a teacher,
        ``teacher_logprob``.
    """
    mask = scored_positions(labels, ignore_index, True).flatten()
    vocab = student_logits.shape[-1]
    targets = torch.cat([labels[:, 1:], labels[:, :1]], dim=1).flatten().clamp(min=0)  # the next token
    sampled = torch.cat([sampler_logprobs[:, 1:], sampler_logprobs[:, :1]], dim=1).flatten()
    rows = student_logits.reshape(-1, vocab)
    dense = None if teacher_logits is None else teacher_logits.reshape(-1, vocab)
    sums = {name: torch.zeros((), dtype=torch.float64, device=rows.device)
            for name in ('sampler_gap', 'sampler_abs_gap', *(('teacher_logprob',) if dense is not None else ()))}
    sums['tokens'] = mask.sum(dtype=torch.float64)
    chunk = max(1, (chunk_elements or default_chunk_elements(rows.device)) // vocab)
    for start in range(0, rows.shape[0], chunk):
        keep = mask[start:start + chunk]
        target = targets[start:start + chunk][keep][:, None]
        log_q = F.log_softmax(rows[start:start + chunk][keep].float() / sampler_temperature, dim=-1)
        gap = (sampled[start:start + chunk][keep].double() - log_q.gather(1, target).squeeze(1).double())
        sums['sampler_gap'] += gap.sum()
        sums['sampler_abs_gap'] += gap.abs().sum()
        if dense is not None:
            log_p = F.log_softmax(dense[start:start + chunk][keep].float() / temperature, dim=-1)
            sums['teacher_logprob'] += log_p.gather(1, target).sum(dtype=torch.float64)
    return sums

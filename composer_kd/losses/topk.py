"""The hybrid distillation loss against a sparse teacher: its top-k next tokens and one "rest" bucket.

Shapes: B batch, T sequence length, V vocabulary, K entries kept per position, C rows of one chunk.

A precomputed teacher keeps, per position, its K most likely next tokens with their log-probabilities and
(optionally) the log of the probability mass outside them. The loss compares two distributions over the
same K + 1 buckets — the K tokens one by one, and everything else as one bucket:

* teacher: ``p_T(i)`` for the K ids, and ``P_rest`` = 1 − Σ ``p_T(i)``;
* student: ``q_T(i)`` for the same ids, and ``Q_rest`` = Σ of ``q_T(v)`` over the other V − K ids.

Every divergence of ``DIVERGENCES`` is then applied to those K + 1 buckets unchanged. With K = V there is no
rest bucket and the loss *is* ``distillation_loss`` on the full teacher.

Temperature. The stored log-probs are the teacher's at temperature 1, ``lp(i) = log softmax(t)(i)``. At a
temperature T the teacher's distribution is ``p_T(v) ∝ p(v)^(1/T)``, so its top-K entries are, exactly,
``p_T(i) = (1 − P_rest,T) · softmax_K(lp / T)(i)``: only the rest mass at T is needed, and
``precompute-teacher`` records it (``log P_rest,T``, computed from the full logits) for every temperature
listed in its config. At T = 1 without a record the rest is ``1 − Σ exp(lp)``; at T ≠ 1 it cannot be derived
from the top-K (it depends on how the rest's mass is spread), so a record is required there unless K = V.
"""

from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F

from composer_kd.losses.arguments import (
    check_distillation_args,
    check_student_and_labels,
    scored_positions,
    shifted_targets,
)
from composer_kd.losses.chunked import RowsFn, autograd_rows, chunked_loss_sums
from composer_kd.losses.divergences import DIVERGENCES

__all__ = ['TopKTeacher', 'check_topk_teacher', 'teacher_buckets', 'topk_distillation_loss', 'topk_rows']

_TINY = torch.finfo(torch.float32).tiny  # the floor of the student's rest mass before its log


class TopKTeacher(NamedTuple):
    """A sparse teacher for a batch: what ``topk_distillation_loss`` takes besides the student and labels.

    Attributes:
        ids (Tensor): ``(B, T, K)`` integer token ids, distinct at each position, most likely first.
        logprobs (Tensor): ``(B, T, K)`` the teacher's log-probabilities of ``ids`` at temperature 1.
        rest_logprob (Tensor, optional): ``(B, T)`` log of the teacher's mass outside ``ids`` at the loss's
            temperature.
    """
    ids: torch.Tensor
    logprobs: torch.Tensor
    rest_logprob: Optional[torch.Tensor] = None


def teacher_buckets(logprobs: torch.Tensor, rest_logprob: Optional[torch.Tensor], temperature: float,
                    has_rest: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The teacher's log-probabilities over the buckets at ``temperature``: ``(C, K)`` and ``(C,)`` (or None).

    Args:
        logprobs (Tensor): ``(C, K)`` top-K log-probabilities at temperature 1.
        rest_logprob (Tensor, optional): ``(C,)`` recorded log rest mass at ``temperature``.
        temperature (float): the distillation temperature.
        has_rest (bool): whether a rest bucket exists (K < V).
    """
    if not has_rest:  # K = V: the K entries are the whole distribution
        return F.log_softmax(logprobs / temperature, dim=-1), None
    if rest_logprob is not None:
        top_mass = torch.log1p(-rest_logprob.exp().clamp(max=1.0))  # log(1 − P_rest)
        return F.log_softmax(logprobs / temperature, dim=-1) + top_mass[:, None], rest_logprob
    if temperature != 1.0:
        raise ValueError(f'temperature={temperature:g} with K < V needs teacher_rest_logprob (the teacher\'s mass '
                         'outside the top-K at that temperature; precompute-teacher records it)')
    lse = torch.logsumexp(logprobs, dim=-1)
    logprobs = logprobs - lse.clamp(min=0.0)[:, None]  # entries that sum past 1 (rounding) are scaled to 1
    return logprobs, torch.log1p(-lse.exp().clamp(max=1.0))  # log(1 − Σ p); −inf if the entries hold it all


def _closed_form_rows(alpha: float, temperature: float) -> RowsFn:
    """Forward KL over the buckets per row, with the gradient written out.

    With z the student logits, q = softmax(z), q_T = softmax(z/T), K the top ids, p_T the teacher's bucket
    probabilities and Q_rest = Σ_{v∉K} q_T(v):

    * KL = [Σ_K p_T·log p_T + P_rest·log P_rest] − Σ_K p_T·log q_T − P_rest·log Q_rest (the bracket is the
      teacher's, computed once for all rows);
    * d/dz_v [alpha·CE + (1−alpha)·T²·KL] = alpha·(q − onehot)_v + (1−alpha)·T·g_v with
      g_v = q_T(v) − p_T(v) for v ∈ K and g_v = q_T(v)·(1 − P_rest / Q_rest) for the rest.

    Q_rest is summed over the rest's own entries (the K entries zeroed in place), never as 1 − Σ_K q_T, so
    it stays exact when the student puts almost nothing there, and q_T(v) / Q_rest ≤ 1 keeps the rest's
    gradient bounded by P_rest.

    Teacher rows: ids ``(C, K)``, p_T ``(C, K)``, the bracket ``(C,)``, and P_rest ``(C,)`` when K < V.
    """

    def rows(student: torch.Tensor, teacher_rows: tuple[torch.Tensor, ...], targets: torch.Tensor,
             needs_grad: bool) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        ids, p_topk, teacher_neg_entropy = teacher_rows[:3]
        log_q = F.log_softmax(student, dim=-1)
        ce = -log_q.gather(1, targets[:, None]).squeeze(1)
        log_q_t = log_q if temperature == 1.0 else F.log_softmax(student / temperature, dim=-1)
        log_q_topk = log_q_t.gather(1, ids)  # (C, K)
        kd = teacher_neg_entropy - torch.linalg.vecdot(p_topk, log_q_topk)
        q_topk = log_q_topk.exp()
        q_t = log_q_t.exp_()  # log_q_t is not needed past this point (log_q may be the same buffer)
        rest_factor = 1.0
        if len(teacher_rows) > 3:  # a rest bucket: K < V
            p_rest = teacher_rows[3]
            q_rest = q_t.scatter_(1, ids, 0.0).sum(dim=-1).clamp_(min=_TINY)  # q_t: the rest's entries only now
            kd = kd - p_rest * q_rest.log()
            rest_factor = (1.0 - p_rest / q_rest)[:, None]
        if not needs_grad:
            return ce, kd, None
        if temperature == 1.0:  # q_t is q: one buffer, alpha·q + (1−alpha)·g
            grad = q_t.mul_(alpha + (1.0 - alpha) * rest_factor)
            grad.scatter_(1, ids, q_topk - (1.0 - alpha) * p_topk)
        else:
            q = log_q.exp()
            scale = (1.0 - alpha) * temperature
            grad = q_t.mul_(scale * rest_factor).add_(q, alpha=alpha)
            grad.scatter_(1, ids, scale * (q_topk - p_topk) + alpha * q.gather(1, ids))
        grad.scatter_add_(1, targets[:, None], grad.new_full((targets.numel(), 1), -alpha))
        return ce, kd, grad

    return rows


def _divergence_values(
        temperature: float, divergence: str, params: dict[str, float]
) -> Callable[[torch.Tensor, tuple[torch.Tensor, ...], torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Per-row CE and bucket divergence of one chunk, differentiable by autograd."""
    divergence_fn = DIVERGENCES[divergence][0]

    def values(student: torch.Tensor, teacher_rows: tuple[torch.Tensor, ...],
               targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ids, log_p_topk = teacher_rows[0], teacher_rows[1]
        log_q = F.log_softmax(student, dim=-1)
        ce = -log_q.gather(1, targets[:, None]).squeeze(1)
        log_q_t = log_q if temperature == 1.0 else F.log_softmax(student / temperature, dim=-1)
        log_q_topk = log_q_t.gather(1, ids)
        if len(teacher_rows) == 2:  # K = V: no rest bucket
            return ce, divergence_fn(log_p_topk, log_q_topk, **params)
        q_rest = log_q_t.exp().scatter(1, ids, 0.0).sum(dim=-1)  # the rest's own entries (see the closed form)
        p_log = torch.cat([log_p_topk, teacher_rows[2][:, None]], dim=1)  # (C, K + 1)
        q_log = torch.cat([log_q_topk, q_rest.clamp(min=_TINY).log()[:, None]], dim=1)
        return ce, divergence_fn(p_log, q_log, **params)

    return values


def check_topk_teacher(ids: torch.Tensor, logprobs: torch.Tensor, rest_logprob: Optional[torch.Tensor], B: int, T: int,
                       V: int) -> None:
    """Refuses top-K teacher tensors (``teacher_topk_ids``, ``teacher_topk_logprobs``, ``teacher_rest_logprob``)
    that do not fit a ``(B, T)`` batch over V vocabulary entries."""
    if ids.dim() != 3 or ids.shape[:2] != (B, T) or not 1 <= ids.shape[2] <= V:
        raise ValueError(f'teacher_topk_ids must be (B, T, K) = ({B}, {T}, K) with 1 <= K <= {V}, got shape '
                         f'{tuple(ids.shape)}')
    if ids.is_floating_point():
        raise ValueError(f'teacher_topk_ids must hold integer ids, got dtype {ids.dtype}')
    if logprobs.shape != ids.shape:
        raise ValueError(f'teacher_topk_logprobs shape {tuple(logprobs.shape)} does not match '
                         f'teacher_topk_ids shape {tuple(ids.shape)}')
    if rest_logprob is not None and rest_logprob.shape != (B, T):
        raise ValueError(f'teacher_rest_logprob must be (B, T) = ({B}, {T}), got shape {tuple(rest_logprob.shape)}')


def topk_rows(ids: torch.Tensor, logprobs: torch.Tensor, rest_logprob: Optional[torch.Tensor], vocab_size: int,
              alpha: float, temperature: float, divergence: str, params: dict[str, float],
              dtype: torch.dtype) -> tuple[tuple[torch.Tensor, ...], RowsFn]:
    """The teacher's per-row tensors and the rows function of the top-K loss, for R rows.

    The teacher's buckets are ``(R, K)``-sized: built for every row at once, outside the chunk loop.

    Args:
        ids (Tensor): ``(R, K)`` integer ids. logprobs (Tensor): ``(R, K)`` at temperature 1.
        rest_logprob (Tensor, optional): ``(R,)`` log rest mass at ``temperature``.
        vocab_size (int): V (a rest bucket exists when K < V).
        alpha, temperature, divergence, params: the loss settings (already checked).
        dtype (torch.dtype): the compute dtype (float32, or float64).
    """
    K = ids.shape[1]
    rest = rest_logprob.to(dtype) if rest_logprob is not None else None
    log_p_topk, log_p_rest = teacher_buckets(logprobs.to(dtype), rest, temperature, has_rest=K < vocab_size)
    ids = ids.long()
    if divergence != 'forward_kl':
        teacher = (ids, log_p_topk) if log_p_rest is None else (ids, log_p_topk, log_p_rest)
        return teacher, autograd_rows(_divergence_values(temperature, divergence, params), alpha, temperature)
    p_topk = log_p_topk.exp()
    neg_entropy = torch.xlogy(p_topk, p_topk).sum(dim=-1)  # Σ p·log p, 0·log 0 = 0
    if log_p_rest is None:
        return (ids, p_topk, neg_entropy), _closed_form_rows(alpha, temperature)
    p_rest = log_p_rest.exp()
    return (ids, p_topk, neg_entropy + torch.xlogy(p_rest, p_rest), p_rest), _closed_form_rows(alpha, temperature)


def topk_distillation_loss(
    student_logits: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    labels: torch.Tensor,
    *,
    alpha: float = 0.5,
    temperature: float = 1.0,
    divergence: str = 'forward_kl',
    ignore_index: int = -100,
    shift_labels: bool = True,
    teacher_rest_logprob: Optional[torch.Tensor] = None,
    chunk_elements: Optional[int] = None,
    **divergence_kwargs: float,
) -> dict[str, torch.Tensor]:
    """Hybrid cross-entropy + distillation loss against a top-K teacher, normalised by the scored tokens.

    The divergence compares teacher and student over K + 1 buckets (the K ids, and the rest of the
    vocabulary as one bucket); see the module docstring for how ``temperature`` applies to stored
    log-probs. With K = V it equals ``distillation_loss`` on the full teacher logits.

    Args:
        student_logits (Tensor): ``(B, T, V)``; any float dtype (bf16 is upcast to float32).
        teacher_topk_ids (Tensor): ``(B, T, K)`` integer ids < V, distinct at each position.
        teacher_topk_logprobs (Tensor): ``(B, T, K)`` the teacher's log-probabilities of those ids at
            temperature 1 (any float dtype).
        labels (Tensor): ``(B, T)`` targets in the Hugging Face convention.
        alpha (float): weight of the cross-entropy term, in [0, 1]. Default: ``0.5``.
        temperature (float): temperature of both distributions in the divergence (> 0). Default: ``1.0``.
        divergence (str): a name of ``DIVERGENCES``. Default: ``'forward_kl'``.
        ignore_index (int): label value excluded from both terms. Default: ``-100``.
        shift_labels (bool): score the logits at t against ``labels[:, t+1]``. Default: ``True``.
        teacher_rest_logprob (Tensor, optional): ``(B, T)`` log of the teacher's mass outside the K ids at
            ``temperature`` (``precompute-teacher`` records it). Default: ``1 − Σ exp(logprobs)``, which needs
            ``temperature == 1`` (or K = V).
        chunk_elements (int, optional): rows × V evaluated at a time. Default: 2**18 on CPU, 2**24 on CUDA.
        **divergence_kwargs: ``beta`` for ``jsd``, ``lam`` for the skew divergences.

    Returns:
        dict[str, Tensor]: scalars ``total = alpha·ce + (1−alpha)·T²·kd``, ``ce`` and ``kd`` (mean token
        bucket divergence); only ``total`` carries a gradient (to ``student_logits``), computed chunk by chunk
        during the forward pass. With no scored token all three are 0.

    Raises:
        ValueError: for an invalid hyperparameter, mismatched shapes, or ``temperature != 1`` with K < V and no
            ``teacher_rest_logprob``.
    """
    params = check_distillation_args(alpha, temperature, divergence, divergence_kwargs)
    check_student_and_labels(student_logits, labels)
    B, T, V = student_logits.shape
    check_topk_teacher(teacher_topk_ids, teacher_topk_logprobs, teacher_rest_logprob, B, T, V)
    mask = scored_positions(labels, ignore_index, shift_labels)
    targets = shifted_targets(labels, mask, shift_labels)
    rest = teacher_rest_logprob.reshape(-1) if teacher_rest_logprob is not None else None
    K = teacher_topk_ids.shape[2]
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    teacher, rows_fn = topk_rows(teacher_topk_ids.reshape(-1, K), teacher_topk_logprobs.reshape(-1, K), rest, V,
                                 alpha, temperature, divergence, params, dtype)
    total, ce, kd = chunked_loss_sums(student_logits, teacher, rows_fn, mask.flatten(), targets.flatten(),
                                      mask.sum().clamp(min=1), alpha, temperature, chunk_elements)
    return {'total': total, 'ce': ce, 'kd': kd}


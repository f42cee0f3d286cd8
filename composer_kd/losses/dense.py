"""The hybrid distillation loss on dense teacher logits: ``alpha·CE + (1−alpha)·T²·D(teacher‖student)``.

Shapes: B batch, T sequence length, V vocabulary, N scored tokens (targets that are not ``ignore_index``),
C rows of one chunk.

Both terms are *sums over the N scored tokens divided by N*. Composer rescales each microbatch's loss by its
share of the global token count (``accumulate_train_batch_on_tokens``), so this normalisation makes one
optimizer step exactly the gradient of the global per-token mean, however the batch is split.
"""

from typing import Optional

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

__all__ = ['dense_rows_fn', 'distillation_loss']


def _closed_form_rows(alpha: float, temperature: float) -> RowsFn:
    """Forward KL (or CE alone, without a teacher) per row, with the gradient written out.

    With z, t the student and teacher logits, q = softmax(z), q_T = softmax(z/T) and p = softmax(t/T):

    * CE = −log q[target];
    * KL(p‖q_T) = Σ p·(t/T − log q_T) − lse(t/T)   (log p is never materialised);
    * d/dz [alpha·CE + (1−alpha)·T²·KL] = alpha·(q − onehot) + (1−alpha)·T·(q_T − p).

    That is a handful of passes over the chunk instead of an autograd graph.
    """

    def rows(student: torch.Tensor, teacher_rows: tuple[torch.Tensor, ...], targets: torch.Tensor,
             needs_grad: bool) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        log_q = F.log_softmax(student, dim=-1)
        ce = -log_q.gather(1, targets[:, None]).squeeze(1)
        if not teacher_rows:
            kd = torch.zeros_like(ce)
            grad = log_q.exp_().mul_(alpha) if needs_grad else None
        else:
            teacher = teacher_rows[0].to(student.dtype)
            scaled_teacher = teacher if temperature == 1.0 else teacher / temperature
            log_q_t = log_q if temperature == 1.0 else F.log_softmax(student / temperature, dim=-1)
            lse_t = torch.logsumexp(scaled_teacher, dim=-1, keepdim=True)
            p = (scaled_teacher - lse_t).exp_()
            # The difference is −inf or nan only where p = 0, where the term is 0.
            diff = (scaled_teacher - log_q_t).nan_to_num_(nan=0.0, neginf=0.0, posinf=float('inf'))
            kd = torch.linalg.vecdot(p, diff) - lse_t.squeeze(1)
            grad = None
            if needs_grad and temperature == 1.0:  # q − (1−alpha)·p, in place over log q
                grad = log_q.exp_().sub_(p, alpha=1.0 - alpha)
            elif needs_grad:
                grad = log_q_t.exp_().sub_(p).mul_((1.0 - alpha) * temperature).add_(log_q.exp_(), alpha=alpha)
        if grad is not None:
            grad.scatter_add_(1, targets[:, None], grad.new_full((targets.numel(), 1), -alpha))
        return ce, kd, grad

    return rows


def _divergence_values(temperature: float, divergence: str, params: dict[str, float]):
    """Per-row CE and divergence of one chunk ``(C, V)``, differentiable by autograd."""
    divergence_fn = DIVERGENCES[divergence][0]

    def values(student: torch.Tensor, teacher_rows: tuple[torch.Tensor, ...],
               targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_q = F.log_softmax(student, dim=-1)
        ce = -log_q.gather(1, targets[:, None]).squeeze(1)
        log_q_t = log_q if temperature == 1.0 else F.log_softmax(student / temperature, dim=-1)
        log_p = F.log_softmax(teacher_rows[0].to(student.dtype) / temperature, dim=-1)
        return ce, divergence_fn(log_p, log_q_t, **params)

    return values


def dense_rows_fn(alpha: float, temperature: float, divergence: str, params: dict[str, float],
                  with_teacher: bool) -> RowsFn:
    """The rows function of the dense loss: closed form for forward KL (and CE alone), autograd otherwise.

    Its teacher rows are ``(teacher logits (C, V),)``, or empty ``()`` without a teacher.
    """
    if not with_teacher or divergence == 'forward_kl':
        return _closed_form_rows(alpha, temperature)
    return autograd_rows(_divergence_values(temperature, divergence, params), alpha, temperature)


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: Optional[torch.Tensor],
    labels: torch.Tensor,
    *,
    alpha: float = 0.5,
    temperature: float = 1.0,
    divergence: str = 'forward_kl',
    ignore_index: int = -100,
    shift_labels: bool = True,
    chunk_elements: Optional[int] = None,
    **divergence_kwargs: float,
) -> dict[str, torch.Tensor]:
    """Hybrid cross-entropy + distillation loss, normalised by the number of scored tokens.

    Args:
        student_logits (Tensor): ``(B, T, V)``; any float dtype (bf16 is upcast to float32).
        teacher_logits (Tensor, optional): ``(B, T, V)``; may be ``None`` only when ``alpha == 1``.
        labels (Tensor): ``(B, T)`` integer targets in the Hugging Face convention, ``ignore_index`` where
            no loss is wanted.
        alpha (float): weight of the cross-entropy term, in [0, 1]. Default: ``0.5``.
        temperature (float): softmax temperature of both distributions in the divergence (> 0); the
            cross-entropy always uses temperature 1. Default: ``1.0``.
        divergence (str): one of ``forward_kl``, ``reverse_kl``, ``jsd`` (``beta``), ``skew_kl`` (``lam``),
            ``skew_reverse_kl`` (``lam``), ``tvd``. Default: ``'forward_kl'``.
        ignore_index (int): label value excluded from both terms. Default: ``-100``.
        shift_labels (bool): score the logits at t against ``labels[:, t+1]`` (causal LM). Default: ``True``.
        chunk_elements (int, optional): rows × V evaluated at a time; bounds the float32 working memory.
            Default: 2**18 on CPU, 2**24 on CUDA.
        **divergence_kwargs: ``beta`` for ``jsd``, ``lam`` for the skew divergences.

    Returns:
        dict[str, Tensor]: scalars ``total = alpha·ce + (1−alpha)·T²·kd``, ``ce`` (mean token cross-entropy)
        and ``kd`` (mean token divergence), in float32 (float64 for float64 input). Only ``total`` carries a
        gradient, to ``student_logits`` (the teacher is a constant target); it is computed chunk by chunk
        during the forward pass, so no ``(N, V)`` intermediate outlives its chunk. With no scored token all
        three are 0 and the gradient is 0.

    Raises:
        ValueError: for an invalid hyperparameter or mismatched shapes.
    """
    params = check_distillation_args(alpha, temperature, divergence, divergence_kwargs)
    check_student_and_labels(student_logits, labels)
    if teacher_logits is None:
        if alpha != 1.0:
            raise ValueError(f'teacher_logits is None, which needs alpha == 1, got alpha={alpha!r}')
    elif teacher_logits.shape != student_logits.shape:
        raise ValueError(f'teacher_logits shape {tuple(teacher_logits.shape)} does not match '
                         f'student_logits shape {tuple(student_logits.shape)}')

    mask = scored_positions(labels, ignore_index, shift_labels)
    targets = shifted_targets(labels, mask, shift_labels)
    teacher = () if teacher_logits is None else (teacher_logits.reshape(-1, teacher_logits.shape[-1]),)
    rows_fn = dense_rows_fn(alpha, temperature, divergence, params, teacher_logits is not None)
    total, ce, kd = chunked_loss_sums(student_logits, teacher, rows_fn, mask.flatten(), targets.flatten(),
                                      mask.sum().clamp(min=1), alpha, temperature, chunk_elements)
    return {'total': total, 'ce': ce, 'kd': kd}

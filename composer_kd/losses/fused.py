"""The hybrid distillation loss from final hidden states and LM heads: no full-vocabulary tensor at all.

Shapes: B batch, T sequence length, H a model's hidden size, V the shared vocabulary (the ids both models
score), V' a head's output rows (≥ V: padded rows are cut), N scored tokens, C rows per chunk.

The logits path materialises the student's and the teacher's ``(B, T, V)`` logits and the ``(B, T, V)``
gradient: at V = 128,256 and 16k tokens per device that is 3 × 4 GiB in bf16. Here the heads are applied one
chunk of C scored rows at a time — student logits ``(C, V)``, teacher logits ``(C, V)`` — the chunk's loss
and its gradient w.r.t. the logits come from the same rows functions as the logits path (``dense.py``,
``topk.py``), and that gradient is pushed through the head at once: ``dL/dh = g·W`` into ``(N, H)`` and
``dL/dW += gᵀ·h`` into ``(V', H)``. The largest tensors left are the head's weight gradient (which the
optimizer needs anyway) and one chunk.

As in ``chunked.py`` the gradient is computed in the forward pass and handed over by a single backward.
"""

from typing import Any, Callable, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F

from composer_kd.losses.arguments import (
    check_distillation_args,
    scored_positions,
    shifted_targets,
)
from composer_kd.losses.chunked import LossSums, RowsFn
from composer_kd.losses.dense import dense_rows_fn
from composer_kd.losses.ensemble import check_ensemble_weights, ensemble_teacher_logits
from composer_kd.losses.precision import float32_reductions, scale_
from composer_kd.losses.topk import TopKTeacher, check_topk_teacher, topk_rows

__all__ = [
    'FusedPlan', 'LinearHead', 'default_fused_chunk_elements', 'fused_distillation_loss', 'head_logits',
    'plan_fused_loss'
]

# (index of C rows (C,)) -> the teacher's tensors for those rows, as the rows function takes them
TeacherRows = Callable[[torch.Tensor], tuple[torch.Tensor, ...]]


class LinearHead(NamedTuple):
    """A model's final hidden states and its LM head: ``logits = hidden @ weight.T + bias``.

    Attributes:
        hidden (Tensor): ``(B, T, H)`` the final hidden states (after the final norm).
        weight (Tensor): ``(V', H)`` the head's weight (the input embeddings when tied).
        bias (Tensor, optional): ``(V',)``.
    """
    hidden: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor] = None


def default_fused_chunk_elements(device: torch.device) -> int:
    """Rows × V per chunk. Each chunk streams the student's head weight through three matmuls (and a teacher's
    through one), so chunks need enough rows to keep those efficient, and few enough to keep the chunk small:
    32 MiB of float32 logits on CPU (64 rows at V = 128k; 32 and 128 rows made whole KD steps slower in
    ``benchmarks/step_overhead.py``), 512 MiB on CUDA (1,024 rows; not yet measured)."""
    return 1 << 27 if device.type == 'cuda' else 1 << 23


def head_logits(head: LinearHead, vocab: int, rows: torch.Tensor) -> torch.Tensor:
    """The first ``vocab`` logits ``(C, V)`` of the flattened ``(B·T)`` rows ``rows`` of ``head``."""
    bias = None if head.bias is None else head.bias[:vocab]
    return F.linear(head.hidden.reshape(-1, head.hidden.shape[-1])[rows], head.weight[:vocab], bias)


class _FusedHeadLoss(torch.autograd.Function):
    """Returns ``(total, ce, kd)`` sums over the scored rows divided by ``n``; only ``total`` has a gradient (to
    the student's hidden states, head weight and bias)."""

    @staticmethod
    def forward(ctx: Any, grad_enabled: bool, hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                teacher_rows: TeacherRows, rows_fn: RowsFn, rows: torch.Tensor, targets: torch.Tensor, n: torch.Tensor,
                alpha: float, temperature: float, vocab: int, dtype: torch.dtype,
                chunk_rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        flat = hidden.detach().reshape(-1, hidden.shape[-1])
        w = weight.detach()[:vocab]
        b = None if bias is None else bias.detach()[:vocab]
        need_h, need_w = grad_enabled and ctx.needs_input_grad[1], grad_enabled and ctx.needs_input_grad[2]
        need_b = grad_enabled and bias is not None and ctx.needs_input_grad[3]
        needs_grad = need_h or need_w or need_b
        # The weight's gradient is summed over chunks in float32 at least (a bf16 sum of 100 chunks loses digits).
        acc = torch.promote_types(weight.dtype, torch.float32)
        grad_h = torch.zeros_like(flat) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_b else None
        sums = LossSums(alpha, temperature, dtype, hidden.device)
        for start in range(0, rows.numel(), chunk_rows):
            index = rows[start:start + chunk_rows]
            h = flat[index]  # (C, H)
            student = F.linear(h, w, b).to(dtype)  # (C, V); under autocast in bf16, as the logits path has it
            teacher = teacher_rows(index)
            with float32_reductions(hidden.device):
                ce, kd, g = rows_fn(student, teacher, targets[index], needs_grad)
            sums.add(ce, kd)
            if not needs_grad:
                continue
            g = g.div_(n)  # (C, V), d total / d logits of these rows
            g_low = g.to(w.dtype)  # the head's dtype, as the logits path's backward has it
            if grad_h is not None:
                grad_h.index_copy_(0, index, (g_low @ w).to(grad_h.dtype))
            if grad_w is not None and acc == w.dtype:
                grad_w[:vocab].addmm_(g.t(), h)
            elif grad_w is not None:  # bf16/fp16 head: the fast low-precision matmul, summed in float32
                grad_w[:vocab] += g_low.t() @ h.to(w.dtype)
            if grad_b is not None:
                grad_b[:vocab] += g.sum(dim=0).to(acc)
        ctx.grads = (grad_h, grad_w, grad_b) if needs_grad else None
        ctx.shapes = (hidden.shape, weight.dtype, None if bias is None else bias.dtype)
        return sums.finish(ctx, n)

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor, *_: Any) -> tuple[Optional[torch.Tensor], ...]:
        if ctx.grads is None:
            raise RuntimeError('the distillation loss computes its gradient once; call backward on it only once')
        (grad_h, grad_w, grad_b), ctx.grads = ctx.grads, None
        hidden_shape, weight_dtype, bias_dtype = ctx.shapes
        grad_h = None if grad_h is None else scale_(grad_h, grad_total).view(hidden_shape)
        grad_w = None if grad_w is None else scale_(grad_w, grad_total).to(weight_dtype)  # summed in float32
        grad_b = None if grad_b is None else scale_(grad_b, grad_total).to(bias_dtype)
        return (None, grad_h, grad_w, grad_b) + (None,) * 10


def _check_head(name: str, head: LinearHead, batch: tuple[int, int], vocab: int) -> None:
    hidden, weight, bias = head
    if hidden.dim() != 3 or tuple(hidden.shape[:2]) != batch:
        raise ValueError(f'{name} hidden states must be (B, T, H) = ({batch[0]}, {batch[1]}, H), got shape '
                         f'{tuple(hidden.shape)}')
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[2] or weight.shape[0] < vocab:
        raise ValueError(f'{name} head weight must be (V\', H) = (>= {vocab}, {hidden.shape[2]}), got shape '
                         f'{tuple(weight.shape)}')
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f'{name} head bias must be ({weight.shape[0]},), got shape {tuple(bias.shape)}')


def fused_distillation_loss(
    student: LinearHead,
    labels: torch.Tensor,
    *,
    teachers: Sequence[LinearHead] = (),
    teacher_topk: Optional[TopKTeacher] = None,
    teacher_weights: Optional[Sequence[float]] = None,
    ensemble: str = 'probs',
    vocab_size: Optional[int] = None,
    alpha: float = 0.5,
    temperature: float = 1.0,
    divergence: str = 'forward_kl',
    ignore_index: int = -100,
    shift_labels: bool = True,
    chunk_elements: Optional[int] = None,
    **divergence_kwargs: float,
) -> dict[str, torch.Tensor]:
    """``distillation_loss`` (or ``topk_distillation_loss``) from hidden states and heads, chunk by chunk.

    Equal to computing ``logits = hidden @ weight[:V].T (+ bias)`` for the student and every teacher and
    calling the logits loss (the ensemble through ``ensemble_teacher_logits``), in value and in the gradient of
    ``total`` w.r.t. the student's hidden states, head weight and bias; but no ``(N, V)`` tensor outlives a
    chunk.

    Args:
        student (LinearHead): hidden ``(B, T, H)`` and head; receives the gradient.
        labels (Tensor): ``(B, T)`` targets in the Hugging Face convention.
        teachers (Sequence[LinearHead]): the teachers' hidden states ``(B, T, H')`` and heads (constants); several
            form an ensemble. Empty for a top-K teacher or none (then ``alpha`` must be 1).
        teacher_topk (TopKTeacher, optional): a precomputed sparse teacher instead of ``teachers``.
        teacher_weights (Sequence[float], optional), ensemble (str): how several teachers combine (see
            ``ensemble_teacher_logits``). Default: equal weights, ``'probs'``.
        vocab_size (int, optional): V, the leading logits scored (rows past it are padding). Default: the
            student head's rows.
        alpha, temperature, divergence, ignore_index, shift_labels, **divergence_kwargs: as in
            ``distillation_loss``.
        chunk_elements (int, optional): rows × V per chunk. Default: ``default_fused_chunk_elements(device)``.

    Returns:
        dict[str, Tensor]: scalars ``total``, ``ce``, ``kd`` as ``distillation_loss`` returns them.

    Raises:
        ValueError: for an invalid hyperparameter, mismatched shapes, or both kinds of teacher.
    """
    plan = plan_fused_loss(student, labels, teachers, teacher_topk, teacher_weights, ensemble, vocab_size, alpha,
                           temperature, divergence, ignore_index, shift_labels, chunk_elements, divergence_kwargs)
    total, ce, kd = _FusedHeadLoss.apply(torch.is_grad_enabled(), student.hidden, student.weight, student.bias,
                                         plan.teacher_rows, plan.rows_fn, plan.rows, plan.targets, plan.n,
                                         float(alpha), float(temperature), plan.vocab, plan.dtype, plan.chunk_rows)
    return {'total': total, 'ce': ce, 'kd': kd}


class FusedPlan(NamedTuple):
    """What a chunked pass over the scored rows needs (``plan_fused_loss``)."""
    rows: torch.Tensor  # (N,) the scored positions of the flattened (B·T) rows
    targets: torch.Tensor  # (B·T,) target ids, 0 where unscored
    n: torch.Tensor  # the normaliser: N, at least 1
    teacher_rows: TeacherRows  # a chunk's teacher tensors, as rows_fn takes them
    rows_fn: RowsFn
    vocab: int  # V
    dtype: torch.dtype  # the compute dtype
    chunk_rows: int  # C
    teacher: str  # 'none', 'dense' (logits as teacher_rows[0]) or 'topk' (ids as teacher_rows[0], most likely first)


def plan_fused_loss(student: LinearHead, labels: torch.Tensor, teachers: Sequence[LinearHead],
                    teacher_topk: Optional[TopKTeacher], teacher_weights: Optional[Sequence[float]], ensemble: str,
                    vocab_size: Optional[int], alpha: float, temperature: float, divergence: str, ignore_index: int,
                    shift_labels: bool, chunk_elements: Optional[int],
                    divergence_kwargs: dict[str, float]) -> FusedPlan:
    """Checks the arguments of ``fused_distillation_loss`` and prepares its pass (the arguments mean the same).

    Raises:
        ValueError: for an invalid hyperparameter, mismatched shapes, or both kinds of teacher.
    """
    params = check_distillation_args(alpha, temperature, divergence, divergence_kwargs)
    hidden, weight = student.hidden, student.weight
    vocab = int(weight.shape[0]) if vocab_size is None else int(vocab_size)
    if hidden.dim() != 3 or labels.shape != hidden.shape[:2]:
        raise ValueError(f'student hidden states must be (B, T, H) and labels (B, T), got shapes '
                         f'{tuple(hidden.shape)} and {tuple(labels.shape)}')
    B, T = labels.shape
    for name, head in [('student', student), *((f'teacher {i}', t) for i, t in enumerate(teachers))]:
        _check_head(name, head, (B, T), vocab)
    if teachers and teacher_topk is not None:
        raise ValueError('pass teachers (hidden states and heads) or teacher_topk, not both')
    if not teachers and teacher_topk is None and alpha != 1.0:
        raise ValueError(f'without a teacher the loss needs alpha == 1, got alpha={alpha!r}')
    weights = check_ensemble_weights(teacher_weights, len(teachers)) if teachers else []

    mask = scored_positions(labels, ignore_index, shift_labels)
    targets = shifted_targets(labels, mask, shift_labels).flatten()
    rows = mask.flatten().nonzero().squeeze(1)
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    teacher_rows: TeacherRows
    if teacher_topk is not None:
        check_topk_teacher(teacher_topk.ids, teacher_topk.logprobs, teacher_topk.rest_logprob, B, T, vocab)
        K = teacher_topk.ids.shape[2]
        rest = None if teacher_topk.rest_logprob is None else teacher_topk.rest_logprob.reshape(-1)
        topk, rows_fn = topk_rows(teacher_topk.ids.reshape(-1, K), teacher_topk.logprobs.reshape(-1, K), rest, vocab,
                                  alpha, temperature, divergence, params, dtype)
        teacher_rows = lambda index: tuple(t[index] for t in topk)  # noqa: E731
    else:
        rows_fn = dense_rows_fn(alpha, temperature, divergence, params, with_teacher=bool(teachers))
        teacher_rows = _dense_teacher_rows(list(teachers), weights, ensemble, temperature, vocab)
    elements = chunk_elements or default_fused_chunk_elements(hidden.device)
    kind = 'topk' if teacher_topk is not None else 'dense' if teachers else 'none'
    return FusedPlan(rows, targets, mask.sum().clamp(min=1), teacher_rows, rows_fn, vocab, dtype,
                     max(1, elements // max(vocab, 1)), kind)


def _dense_teacher_rows(teachers: list[LinearHead], weights: list[float], ensemble: str, temperature: float,
                        vocab: int) -> TeacherRows:
    """The teacher logits of a chunk of rows: one teacher's own, or the ensemble's; ``()`` without a teacher."""

    def rows(index: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if not teachers:
            return ()
        with torch.no_grad():
            if len(teachers) == 1:
                return (head_logits(teachers[0], vocab, index),)
            each = (head_logits(t, vocab, index) for t in teachers)
            return (ensemble_teacher_logits(each, weights, ensemble, temperature),)

    return rows

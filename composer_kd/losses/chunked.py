"""Memory-lean evaluation of a hybrid loss: row chunks, with the gradient computed in the forward pass.

Shapes: B batch, T sequence length, V vocabulary, R = B·T positions, C rows per chunk.

Done naively, autograd keeps a dozen ``(N, V)`` float32 intermediates alive until backward (log-softmaxes,
probabilities, differences): at a 128k vocabulary and 16k tokens that is ~8 GiB each, and on any device the
allocations dominate the step. Here each chunk of C rows is upcast, differentiated on its own (in closed
form where a loss writes its gradient out, by autograd otherwise) and reduced at once, so the only
full-size tensor is the gradient ``(B, T, V)`` in the logits' dtype — the tensor the language-model head's
backward needs anyway — which backward scales in place and hands over.

A loss plugs in as a *rows function*: given one chunk of student logits, the matching rows of the teacher's
tensors and the targets, it returns per-row CE, per-row divergence and the chunk's gradient. The dense loss
(``dense.py``) and the top-k loss (``topk.py``) share this driver.

Batches that are mostly real tokens are walked in contiguous row ranges (no gather copies); heavily padded
ones gather their scored rows first so padding costs nothing.
"""

from typing import Any, Callable, Optional

import torch

from composer_kd.losses.precision import float32_reductions, scale_

__all__ = ['LossSums', 'RowsFn', 'autograd_rows', 'chunked_loss_sums', 'default_chunk_elements']

_DENSE_FRACTION = 0.75  # walk contiguous ranges when at least this share of positions is scored

# (student chunk (C, V) in the compute dtype, teacher tensors' rows (each (C, ...)), targets (C,), needs_grad)
#   -> (CE (C,), divergence (C,), gradient (C, V) of Σ_rows alpha·CE + (1−alpha)·T²·divergence, or None)
RowsFn = Callable[[torch.Tensor, tuple[torch.Tensor, ...], torch.Tensor, bool],
                  tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]]


def default_chunk_elements(device: torch.device) -> int:
    """Elements (rows × V) per chunk: a float32 chunk of 1 MiB stays in a CPU core's cache (measured 4× faster
    per row than 8 MiB chunks on the benchmark machine); GPU kernels want large chunks."""
    return 1 << 24 if device.type == 'cuda' else 1 << 18


def autograd_rows(values: Callable[[torch.Tensor, tuple[torch.Tensor, ...], torch.Tensor],
                                   tuple[torch.Tensor, torch.Tensor]], alpha: float, temperature: float) -> RowsFn:
    """A rows function whose gradient comes from autograd on one chunk.

    Args:
        values: ``(student (C, V), teacher rows, targets (C,)) -> (CE (C,), divergence (C,))``, differentiable
            in ``student``; every row must depend on its own student row only.
        alpha, temperature: the hybrid weights.
    """

    def rows(student: torch.Tensor, teacher: tuple[torch.Tensor, ...], targets: torch.Tensor,
             needs_grad: bool) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        with torch.enable_grad() if needs_grad else torch.no_grad():
            student.requires_grad_(needs_grad)
            ce, kd = values(student, teacher, targets)
            grad = None
            if needs_grad:  # rows are independent, so a row that is inf or nan leaves the others' gradients alone
                rows_total = alpha * ce + (1.0 - alpha) * temperature**2 * kd
                grad = torch.autograd.grad(rows_total.sum(), student)[0]
        return ce.detach(), kd.detach(), grad

    return rows


class LossSums:
    """The running ``(total, ce, kd)`` sums of a chunked loss, and their scalars divided by ``n`` at the end."""

    def __init__(self, alpha: float, temperature: float, dtype: torch.dtype, device: torch.device) -> None:
        self.alpha, self.kd_weight = alpha, (1.0 - alpha) * temperature**2
        self.sums = torch.zeros(3, dtype=dtype, device=device)

    def add(self, ce: torch.Tensor, kd: torch.Tensor) -> None:
        """Adds one chunk's per-row CE and divergence ``(C,)``."""
        ce_sum, kd_sum = ce.sum(), kd.sum()
        self.sums += torch.stack([self.alpha * ce_sum + self.kd_weight * kd_sum, ce_sum, kd_sum])

    def finish(self, ctx: Any, n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(total, ce, kd)`` divided by ``n``, each with its own storage (callers scale in place); only ``total``
        is differentiable."""
        total, ce, kd = (t.clone() for t in (self.sums / n).unbind())
        ctx.mark_non_differentiable(ce, kd)
        return total, ce, kd


class _ChunkedLoss(torch.autograd.Function):
    """Returns ``(total, ce, kd)`` sums over scored rows divided by ``n``; only ``total`` has a gradient."""

    @staticmethod
    def forward(ctx: Any, grad_enabled: bool, student_logits: torch.Tensor, teacher: tuple[torch.Tensor, ...],
                rows_fn: RowsFn, scored: torch.Tensor, targets: torch.Tensor, n: torch.Tensor, alpha: float,
                temperature: float, dtype: torch.dtype,
                chunk_rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        vocab = student_logits.shape[-1]
        flat_student = student_logits.reshape(-1, vocab)  # a view, also for a vocabulary slice of contiguous logits
        positions = flat_student.shape[0]
        needs_grad = grad_enabled and ctx.needs_input_grad[1]
        rows = scored.nonzero().squeeze(1)
        dense = rows.numel() >= _DENSE_FRACTION * positions
        grad = None
        if needs_grad:  # dense: every row is written below; sparse: zero the unscored rows now
            grad = torch.empty_like(flat_student)
            if not dense:
                grad.index_fill_(0, (~scored).nonzero().squeeze(1), 0.0)
        sums = LossSums(alpha, temperature, dtype, student_logits.device)
        with float32_reductions(student_logits.device):
            for start in range(0, positions if dense else rows.numel(), chunk_rows):
                # A range of positions (a view; padding rows masked by `valid`), or a gather of scored rows.
                index = slice(start, start + chunk_rows) if dense else rows[start:start + chunk_rows]
                valid = scored[index] if dense else None
                student = flat_student[index].detach().to(dtype)
                ce, kd, chunk_grad = rows_fn(student, tuple(t[index] for t in teacher), targets[index], needs_grad)
                if valid is not None:  # padding rows inside a dense range count for nothing
                    ce, kd = torch.where(valid, ce, 0.0), torch.where(valid, kd, 0.0)
                sums.add(ce, kd)
                if needs_grad:
                    if valid is not None:
                        chunk_grad.masked_fill_(~valid[:, None], 0.0)
                    grad[index] = chunk_grad.div_(n).to(grad.dtype)  # index_put does not cast (bf16 logits)
        ctx.grad, ctx.student_shape = grad, student_logits.shape
        return sums.finish(ctx, n)

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor, *_: Any) -> tuple[Optional[torch.Tensor], ...]:
        # Scaled in place and handed over: no second (B, T, V) buffer. The price is a single backward per loss.
        if ctx.grad is None:
            raise RuntimeError('the distillation loss computes its gradient once; call backward on it only once')
        grad, ctx.grad = ctx.grad, None
        return (None, scale_(grad, grad_total).view(ctx.student_shape)) + (None,) * 9


def chunked_loss_sums(student_logits: torch.Tensor,
                      teacher: tuple[torch.Tensor, ...],
                      rows_fn: RowsFn,
                      scored: torch.Tensor,
                      targets: torch.Tensor,
                      n: torch.Tensor,
                      alpha: float,
                      temperature: float,
                      chunk_elements: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(total, ce, kd)`` over the scored positions of the flattened ``(B·T, V)`` logits, each divided by ``n``.

    Args:
        student_logits (Tensor): ``(B, T, V)``; receives the gradient of ``total`` (the teacher is a constant).
        teacher (tuple[Tensor, ...]): the teacher's tensors with one row per position, ``(B·T, ...)`` each
            (dense logits ``(B·T, V)``; or top-k ids, log-probs, rest mass); empty without a teacher.
        rows_fn (RowsFn): the loss of one chunk of rows.
        scored (Tensor): ``(B·T,)`` bool, the positions that are scored.
        targets (Tensor): ``(B·T,)`` target ids, any valid id at unscored positions.
        n (Tensor): the normaliser (scalar, ≥ 1).
        alpha, temperature: the hybrid weights (``total`` sums ``alpha·ce + (1−alpha)·T²·kd``).
        chunk_elements (int, optional): rows × V per chunk. Default: ``default_chunk_elements(device)``.

    Returns:
        (total, ce, kd) in float32 (float64 for float64 logits). Under ``no_grad`` (eval, metrics) no gradient is
        computed at all.
    """
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    vocab = student_logits.shape[-1]
    chunk_elements = chunk_elements or default_chunk_elements(student_logits.device)
    chunk_rows = max(1, chunk_elements // max(vocab, 1))
    return _ChunkedLoss.apply(torch.is_grad_enabled(), student_logits, teacher, rows_fn, scored, targets, n, alpha,
                              temperature, dtype, chunk_rows)

"""The precision rules every loss follows under mixed precision: reductions in float32 whatever autocast says,
and gradients scaled by a float32 factor before they are rounded to their own dtype.

Shapes: N rows of a tensor, V its last dimension.

Under ``amp_bf16`` autocast runs the ops on its lower-precision list in bf16 — matmuls, and also
``torch.linalg.vecdot``, which the closed-form losses use to sum p·(log p − log q) over the vocabulary. A sum
of 128k terms in bf16 moves the reported KD term by ~1e-4 of its value and single tokens by up to 14%; the
losses upcast their chunks to float32 and then run every reduction with autocast off.

Composer scales each microbatch's loss by its share of the batch's tokens before ``backward``. The losses
hand over a gradient they computed in the forward, in the logits' dtype: multiplying a bf16 gradient by that
factor rounded to bf16 is a systematic error of up to 2^-9 (0.2%) per microbatch, so ``scale_`` multiplies in
float32 and rounds once.
"""

import contextlib

import torch

__all__ = ['float32_reductions', 'scale_']

_SCALE_CHUNK = 1 << 24  # elements upcast at a time when scaling a low-precision gradient (64 MiB of float32)


def float32_reductions(device: torch.device) -> contextlib.AbstractContextManager:
    """A context in which autocast is off on ``device``: ops run in their inputs' dtype (the losses' float32)."""
    return torch.autocast(device.type, enabled=False)


def scale_(grad: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Multiplies ``grad`` by the scalar ``scale`` in place, in float32 at least, rounding once to ``grad``'s dtype;
    a low-precision gradient is upcast a chunk of rows at a time, so no float32 copy of it exists.

    Args:
        grad (Tensor): ``(N, ...)`` in any float dtype.
        scale (Tensor): a scalar, kept in (at least) float32.

    Returns:
        Tensor: ``grad``.
    """
    dtype = torch.promote_types(grad.dtype, torch.float32)
    scale = scale.to(dtype)
    if grad.dtype == dtype:
        return grad.mul_(scale)
    if grad.dim() == 0:
        return grad.copy_(grad.to(dtype).mul_(scale))
    rows = max(1, _SCALE_CHUNK // max(grad[0].numel(), 1))
    for start in range(0, grad.shape[0], rows):
        part = grad[start:start + rows]
        part.copy_(part.to(dtype).mul_(scale))
    return grad

"""The hybrid distillation loss: ``alpha·CE + (1−alpha)·T²·D(teacher‖student)``, a pure function on tensors.

Shapes: B batch, T sequence length, V vocabulary, N scored tokens (targets that are not ``ignore_index``).

Both terms are *sums over the N scored tokens divided by N*. Composer rescales each microbatch's loss by its
share of the global token count (``accumulate_train_batch_on_tokens``), so this normalisation makes one
optimizer step exactly the gradient of the global per-token mean, however the batch is split.
"""

from typing import Any, Optional

import torch

from composer_kd.losses.chunked import hybrid_loss_sums
from composer_kd.losses.divergences import DIVERGENCES

__all__ = ['distillation_loss', 'check_distillation_args', 'scored_positions']


def check_distillation_args(alpha: float, temperature: float, divergence: str,
                            divergence_kwargs: dict[str, Any]) -> dict[str, float]:
    """Validates the loss hyperparameters; returns the divergence's keyword arguments with defaults filled in.

    Raises:
        ValueError: naming the argument and the value, for any value the loss cannot use.
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f'alpha must be a number in [0, 1], got {alpha!r}')
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f'temperature must be a number > 0, got {temperature!r}')
    if divergence not in DIVERGENCES:
        raise ValueError(f'divergence must be one of {sorted(DIVERGENCES)}, got {divergence!r}')
    _, params = DIVERGENCES[divergence]
    unknown = sorted(set(divergence_kwargs) - set(params))
    if unknown:
        allowed = sorted(params) or 'none'
        raise ValueError(f'divergence {divergence!r} takes no argument {unknown[0]!r} (it takes: {allowed})')
    resolved = {}
    for name, (default, low, high) in params.items():
        value = divergence_kwargs.get(name, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            raise ValueError(f'{name} must be a number in [{low}, {high}] for {divergence!r}, got {value!r}')
        resolved[name] = float(value)
    return resolved


def scored_positions(labels: torch.Tensor, ignore_index: int = -100, shift_labels: bool = True) -> torch.Tensor:
    """Boolean ``(B, T)`` mask of the logit positions that are scored; its sum is N.

    With ``shift_labels`` the logits at t predict ``labels[:, t+1]``, so the last position is never scored.
    """
    if not shift_labels:
        return labels != ignore_index
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != ignore_index
    return mask


def _shifted_targets(labels: torch.Tensor, mask: torch.Tensor, shift_labels: bool) -> torch.Tensor:
    """``(B, T)`` target of every logit position: the next label when shifting; 0 where nothing is scored."""
    if shift_labels:
        labels = torch.cat([labels[:, 1:], labels[:, :1]], dim=1)  # the last column is unscored anyway
    return torch.where(mask, labels, torch.zeros_like(labels))


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
    if student_logits.dim() != 3:
        raise ValueError(f'student_logits must be (B, T, V), got shape {tuple(student_logits.shape)}')
    if labels.shape != student_logits.shape[:2]:
        raise ValueError(f'labels must be (B, T) = {tuple(student_logits.shape[:2])}, got shape {tuple(labels.shape)}')
    if teacher_logits is None:
        if alpha != 1.0:
            raise ValueError(f'teacher_logits is None, which needs alpha == 1, got alpha={alpha!r}')
    elif teacher_logits.shape != student_logits.shape:
        raise ValueError(f'teacher_logits shape {tuple(teacher_logits.shape)} does not match '
                         f'student_logits shape {tuple(student_logits.shape)}')

    mask = scored_positions(labels, ignore_index, shift_labels)
    targets = _shifted_targets(labels, mask, shift_labels)
    total, ce, kd = hybrid_loss_sums(student_logits, teacher_logits, mask.flatten(), targets.flatten(),
                                     mask.sum().clamp(min=1), alpha, temperature, DIVERGENCES[divergence][0], params,
                                     chunk_elements)
    return {'total': total, 'ce': ce, 'kd': kd}

"""What every distillation loss shares: hyperparameter checks, the scored positions and their targets.

Shapes: B batch, T sequence length, V vocabulary.
"""

from typing import Any

import torch

from composer_kd.losses.divergences import DIVERGENCES

__all__ = ['check_distillation_args', 'check_student_and_labels', 'scored_positions', 'shifted_targets']


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


def check_student_and_labels(student_logits: torch.Tensor, labels: torch.Tensor) -> None:
    """Refuses student logits that are not ``(B, T, V)`` or labels that are not ``(B, T)``."""
    if student_logits.dim() != 3:
        raise ValueError(f'student_logits must be (B, T, V), got shape {tuple(student_logits.shape)}')
    if labels.shape != student_logits.shape[:2]:
        raise ValueError(f'labels must be (B, T) = {tuple(student_logits.shape[:2])}, got shape {tuple(labels.shape)}')


def scored_positions(labels: torch.Tensor, ignore_index: int = -100, shift_labels: bool = True) -> torch.Tensor:
    """Boolean ``(B, T)`` mask of the logit positions that are scored; its sum is N.

    With ``shift_labels`` the logits at t predict ``labels[:, t+1]``, so the last position is never scored.
    """
    if not shift_labels:
        return labels != ignore_index
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != ignore_index
    return mask


def shifted_targets(labels: torch.Tensor, mask: torch.Tensor, shift_labels: bool) -> torch.Tensor:
    """``(B, T)`` target of every logit position: the next label when shifting; 0 where nothing is scored."""
    if shift_labels:
        labels = torch.cat([labels[:, 1:], labels[:, :1]], dim=1)  # the last column is unscored anyway
    return torch.where(mask, labels, torch.zeros_like(labels))

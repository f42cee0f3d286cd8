"""What every distillation loss shares: its settings' checks (``settings.py``), the scored positions and their
targets.

Shapes: B batch, T sequence length, V vocabulary.
"""

import torch

from composer_kd.losses.settings import check_distillation_args

__all__ = ['check_distillation_args', 'check_student_and_labels', 'scored_positions', 'shifted_targets']


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

"""The hidden-state distillation term: how far the student's intermediate hidden states are from the teacher's,
over pairs of blocks (a student block, a teacher block).

Shapes: B batch, T sequence length, H the hidden size both sides of a pair share (the student's states are
projected to the teacher's width first when they differ: ``model/hidden_state_taps.py``), P pairs, N scored tokens.

Like the logit loss (``dense.py``), the term is a *sum over the N scored tokens divided by N*, over the same
positions (``scored_positions(labels)``: those whose next label is scored). Composer weights each microbatch's loss by
its N (``accumulate_train_batch_on_tokens``), so a step's gradient is that of the per-token mean over the whole batch
however it is split into microbatches and processes — exactly as for the logit loss it is added to. The P pairs are
averaged (DistillKit's convention), so a ``weight`` means the same for any number of pairs.

Per scored token, with s the student's state and t the teacher's (each ``(H,)``):

* ``cosine``: ``1 − s·t / (max(‖s‖, ε)·max(‖t‖, ε))``, ε = 1e-8 (torch's ``cosine_similarity``); in [0, 2].
* ``mse``: ``(1/H)·Σ_h (s_h − t_h)²``, the mean over features (torch's ``mse_loss``).
* ``normalized_mse``: ``Σ_h (s_h − t_h)² / (Σ_h t_h² + H·ε)``, ε = 1e-6: the squared error relative to the teacher
  state's own squared norm, token by token (1 for a student state of 0). ModelOpt's ``normalized_mse_loss`` divides
  the batch's mean squared error by the batch's mean squared target; the ratio taken per token is what keeps the
  term a sum over tokens (exact under any split of the batch), and it keeps the few tokens whose states are orders
  of magnitude larger than the rest (LLMs' "massive activations", typically on the first token) from outweighing
  all the others, as they do in plain ``mse``.

Everything is computed in float32 (float64 stays float64) with autocast off (``precision.py``).
"""

from typing import Callable, Sequence

import torch

from composer_kd.losses.arguments import scored_positions
from composer_kd.losses.precision import float32_reductions

__all__ = ['HIDDEN_STATE_LOSSES', 'hidden_state_loss', 'hidden_state_sums', 'hidden_state_token_losses']

_COSINE_EPS = 1e-8
_NMSE_EPS = 1e-6


def _cosine(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    dot = (student * teacher).sum(-1)
    norms = student.norm(dim=-1).clamp(min=_COSINE_EPS) * teacher.norm(dim=-1).clamp(min=_COSINE_EPS)
    return 1.0 - dot / norms


def _mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return (student - teacher).square().mean(-1)


def _normalized_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return (student - teacher).square().sum(-1) / (teacher.square().sum(-1) + teacher.shape[-1] * _NMSE_EPS)


# name -> per-row loss: (student rows (N, H), teacher rows (N, H)) -> (N,)
HIDDEN_STATE_LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    'cosine': _cosine,
    'mse': _mse,
    'normalized_mse': _normalized_mse,
}


def _check_pair(index: int, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor) -> None:
    if student.dim() != 3 or teacher.dim() != 3:
        raise ValueError(f'pair {index}: hidden states must be (B, T, H), got student {tuple(student.shape)} and '
                         f'teacher {tuple(teacher.shape)}')
    if student.shape[:2] != labels.shape or teacher.shape[:2] != labels.shape:
        raise ValueError(f'pair {index}: the student\'s hidden states {tuple(student.shape)} and the teacher\'s '
                         f'{tuple(teacher.shape)} do not lay out the sequence as the labels {tuple(labels.shape)} do '
                         '(B, T): hidden states can only be compared token by token')
    if student.shape[2] != teacher.shape[2]:
        raise ValueError(f'pair {index}: student width {student.shape[2]} differs from teacher width '
                         f'{teacher.shape[2]}; project the student\'s states first')


def hidden_state_token_losses(student: torch.Tensor, teacher: torch.Tensor, loss: str = 'cosine') -> torch.Tensor:
    """The per-token loss of one pair over every position.

    Args:
        student (Tensor): ``(B, T, H)`` the student's (projected) hidden states.
        teacher (Tensor): ``(B, T, H)`` the teacher's; a constant target (detached).
        loss (str): one of ``HIDDEN_STATE_LOSSES``. Default: ``'cosine'``.

    Returns:
        Tensor: ``(B, T)`` in float32 (float64 for float64 input).
    """
    if loss not in HIDDEN_STATE_LOSSES:
        raise ValueError(f'loss must be one of {sorted(HIDDEN_STATE_LOSSES)}, got {loss!r}')
    dtype = torch.promote_types(student.dtype, torch.float32)
    with float32_reductions(student.device):
        return HIDDEN_STATE_LOSSES[loss](student.to(dtype), teacher.detach().to(dtype))


def hidden_state_sums(students: Sequence[torch.Tensor], teachers: Sequence[torch.Tensor], labels: torch.Tensor, *,
                      loss: str = 'cosine', ignore_index: int = -100,
                      shift_labels: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The pair-averaged sum of the per-token losses over the scored tokens, and their count N.

    Sums of several microbatches (or processes) add up; divided by their summed N they give the term of the whole
    batch (``hidden_state_loss`` of one microbatch is its sum over its own N).

    Args:
        students (Sequence[Tensor]): P student states ``(B, T, H)``, each differentiable.
        teachers (Sequence[Tensor]): P teacher states ``(B, T, H)``, the same widths, pair by pair.
        labels (Tensor): ``(B, T)`` the batch's labels (Hugging Face convention).
        loss (str): ``cosine``, ``mse`` or ``normalized_mse``. Default: ``'cosine'``.
        ignore_index (int): label value that scores nothing. Default: ``-100``.
        shift_labels (bool): position t is scored against ``labels[:, t+1]`` (causal LM). Default: ``True``.

    Returns:
        tuple[Tensor, Tensor]: ``(1/P)·Σ_pairs Σ_scored tokens loss`` (float32, or float64) and N (int64).

    Raises:
        ValueError: for no pairs, P students and teachers that differ in number, or states whose shapes do not
            match each other or the labels.
    """
    if not students or len(students) != len(teachers):
        raise ValueError(f'need one teacher state per student state (at least one pair), got {len(students)} '
                         f'student and {len(teachers)} teacher states')
    for index, (student, teacher) in enumerate(zip(students, teachers)):
        _check_pair(index, student, teacher, labels)
    mask = scored_positions(labels, ignore_index, shift_labels)  # (B, T)
    total = None
    for student, teacher in zip(students, teachers):
        rows = hidden_state_token_losses(student[mask], teacher[mask], loss)  # (N,)
        total = rows.sum() if total is None else total + rows.sum()
    assert total is not None
    return total / len(students), mask.sum()


def hidden_state_loss(students: Sequence[torch.Tensor], teachers: Sequence[torch.Tensor], labels: torch.Tensor, *,
                      loss: str = 'cosine', ignore_index: int = -100, shift_labels: bool = True) -> torch.Tensor:
    """The hidden-state term: ``(1/P)·Σ_pairs (1/N)·Σ_scored tokens loss``; 0 (with a zero gradient) when no token is
    scored. Arguments as ``hidden_state_sums``.

    Returns:
        Tensor: a scalar, float32 (float64 for float64 input), differentiable in ``students``.
    """
    total, count = hidden_state_sums(students, teachers, labels, loss=loss, ignore_index=ignore_index,
                                     shift_labels=shift_labels)
    return total / count.clamp(min=1)

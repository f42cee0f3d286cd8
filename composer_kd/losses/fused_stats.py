"""Evaluation sums from hidden states and LM heads, chunk by chunk: what the eval metrics need, without logits.

Shapes: B batch, T sequence length, H hidden size, V the shared vocabulary, C rows per chunk.
"""

from typing import Optional, Sequence

import torch

from composer_kd.losses.fused import LinearHead, head_logits, plan_fused_loss
from composer_kd.losses.precision import float32_reductions
from composer_kd.losses.topk import TopKTeacher

__all__ = ['fused_token_sums']


@torch.no_grad()
def fused_token_sums(student: LinearHead,
                     labels: torch.Tensor,
                     *,
                     teachers: Sequence[LinearHead] = (),
                     teacher_topk: Optional[TopKTeacher] = None,
                     teacher_weights: Optional[Sequence[float]] = None,
                     ensemble: str = 'probs',
                     vocab_size: Optional[int] = None,
                     temperature: float = 1.0,
                     divergence: str = 'forward_kl',
                     ignore_index: int = -100,
                     shift_labels: bool = True,
                     chunk_elements: Optional[int] = None,
                     **divergence_kwargs: float) -> dict[str, torch.Tensor]:
    """Sums over the scored tokens of the cross-entropy, the divergence and the top-1 agreement with the teacher,
    and their count — the numbers behind ``LanguageCrossEntropy``, ``TeacherDivergenceLoss`` and
    ``TeacherTop1Agreement`` — computed from hidden states and heads (arguments as ``fused_distillation_loss``).

    Returns:
        dict[str, Tensor]: float64 scalars ``ce``, ``kd``, ``top1`` (0 without a teacher) and int64 ``tokens``.
    """
    has_teacher = bool(teachers) or teacher_topk is not None
    plan = plan_fused_loss(student, labels, teachers, teacher_topk, teacher_weights, ensemble, vocab_size,
                           0.0 if has_teacher else 1.0, temperature, divergence, ignore_index, shift_labels,
                           chunk_elements, divergence_kwargs)
    device = student.hidden.device
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    for start in range(0, plan.rows.numel(), plan.chunk_rows):
        index = plan.rows[start:start + plan.chunk_rows]
        logits = head_logits(student, plan.vocab, index).to(plan.dtype)  # (C, V)
        teacher = plan.teacher_rows(index)
        agree = torch.zeros((), device=device)
        if plan.teacher != 'none':  # the teacher's most likely id: first of the top-k, else the argmax
            top1 = teacher[0][:, 0] if plan.teacher == 'topk' else teacher[0].argmax(dim=-1)
            agree = (logits.argmax(dim=-1) == top1).sum()
        with float32_reductions(device):
            ce, kd, _ = plan.rows_fn(logits, teacher, plan.targets[index], False)
        sums += torch.stack([ce.sum().double(), kd.sum().double(), agree.double()])
    return {'ce': sums[0], 'kd': sums[1], 'top1': sums[2], 'tokens': plan.rows.new_tensor(plan.rows.numel())}

"""The fused hybrid loss through Liger-Kernel's Triton kernels, where they compute the same objective (CUDA only).

Shapes: B batch, T sequence length, H hidden size, V the shared vocabulary, R = B·T rows.

Liger's ``LigerFusedLinearJSD(jsd_beta, temperature)`` computes, from hidden states and head weights, the
generalised JSD between the tempered teacher and student distributions, β·KL(p‖m) + (1−β)·KL(q‖m) with
m = β·p + (1−β)·q, averaged over the rows whose label is not ignored — ours for ``jsd`` (``beta``), and
``forward_kl`` (β = 0) and ``reverse_kl`` (β = 1) — with no T² factor and no cross-entropy term. (Liger
special-cases β = 0 and 1 as those KLs, where our ``jsd`` is identically 0: ``jsd`` qualifies strictly inside.) So

    total = alpha · CE + (1 − alpha) · T² · D

is rebuilt from it and ``LigerFusedLinearCrossEntropyLoss`` (the CE term, a second pass over the student's
head, run only when ``alpha > 0``). Both sum the head weight's gradient in float32 (``accum_dtype``), as our
fused loss does. What qualifies: one dense teacher (no ensemble, no precomputed top-k),
``forward_kl``/``reverse_kl``/``jsd`` with 0 < beta < 1, heads without bias, at least one scored token, any alpha
and temperature; CUDA and ``liger-kernel`` installed. Everything else falls back to
``fused_distillation_loss``, and ``liger_refusal`` says why.
"""

import importlib.util
from typing import Mapping, Optional, Sequence

import torch

from composer_kd.losses.arguments import check_distillation_args, scored_positions, shifted_targets
from composer_kd.losses.fused import LinearHead
from composer_kd.losses.topk import TopKTeacher

__all__ = ['LIGER_DIVERGENCES', 'jsd_endpoint_refusal', 'liger_distillation_loss', 'liger_refusal']

# our divergence -> Liger's jsd_beta (None: the divergence's own ``beta``)
LIGER_DIVERGENCES: dict[str, Optional[float]] = {'forward_kl': 0.0, 'reverse_kl': 1.0, 'jsd': None}


def jsd_endpoint_refusal(divergence: str, divergence_kwargs: Mapping[str, float]) -> Optional[str]:
    """Why Liger would compute another objective than ``divergence`` with these arguments; None if it would not."""
    beta = divergence_kwargs.get('beta', 0.5)
    if divergence == 'jsd' and beta in (0.0, 1.0):
        kind = 'forward' if beta == 0.0 else 'reverse'
        return (f'jsd with beta {beta:g} (identically 0 here; Liger computes {kind} KL there: use divergence: '
                f'{kind}_kl)')
    return None


def liger_refusal(student: LinearHead, teachers: Sequence[LinearHead], teacher_topk: Optional[TopKTeacher],
                  divergence: str, labels: torch.Tensor,
                  divergence_kwargs: Optional[Mapping[str, float]] = None) -> Optional[str]:
    """Why Liger's kernels cannot compute this loss; None when they can. The objective is checked first, then
    the machine (so a CPU machine names an objective Liger would get wrong)."""
    if teacher_topk is not None:
        return 'the teacher is a precomputed top-k'
    if len(teachers) != 1:
        return f'{len(teachers)} teachers (Liger distils from one)'
    if divergence not in LIGER_DIVERGENCES:
        return f'divergence {divergence!r} (Liger computes {", ".join(LIGER_DIVERGENCES)})'
    endpoint = jsd_endpoint_refusal(divergence, divergence_kwargs or {})
    if endpoint is not None:
        return endpoint
    if student.bias is not None or teachers[0].bias is not None:
        return 'a head with a bias'
    if not bool((labels != -100).any()):
        return 'no scored token in the batch'
    if student.hidden.device.type != 'cuda':
        return 'Liger\'s kernels run on CUDA only'
    if importlib.util.find_spec('liger_kernel') is None:
        return 'liger-kernel is not installed (pip install "composer-kd[bench]" or liger-kernel)'
    return None


def liger_distillation_loss(student: LinearHead,
                            teacher: LinearHead,
                            labels: torch.Tensor,
                            *,
                            vocab_size: int,
                            alpha: float = 0.5,
                            temperature: float = 1.0,
                            divergence: str = 'forward_kl',
                            ignore_index: int = -100,
                            shift_labels: bool = True,
                            **divergence_kwargs: float) -> dict[str, torch.Tensor]:
    """``fused_distillation_loss`` for one dense teacher through Liger's kernels (``liger_refusal`` must be None).

    Returns:
        dict[str, Tensor]: ``total``, ``ce``, ``kd`` as ``distillation_loss`` returns them (``ce`` is computed
        without a gradient when ``alpha == 0``).
    """
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss, LigerFusedLinearJSD

    params = check_distillation_args(alpha, temperature, divergence, divergence_kwargs)
    endpoint = jsd_endpoint_refusal(divergence, params)
    if endpoint is not None:
        raise ValueError(f'Liger cannot compute {endpoint}')
    beta = LIGER_DIVERGENCES[divergence]
    beta = params['beta'] if beta is None else beta
    mask = scored_positions(labels, ignore_index, shift_labels)
    targets = torch.where(mask, shifted_targets(labels, mask, shift_labels), -100).flatten()  # (R,)
    h_student = student.hidden.reshape(-1, student.hidden.shape[-1])
    h_teacher = teacher.hidden.reshape(-1, teacher.hidden.shape[-1])
    w_student, w_teacher = student.weight[:vocab_size], teacher.weight[:vocab_size].detach()
    kd = LigerFusedLinearJSD(jsd_beta=beta, temperature=temperature, accum_dtype=torch.float32)(
        h_student, w_student, h_teacher.detach(), w_teacher, targets)
    cross_entropy = LigerFusedLinearCrossEntropyLoss(accum_dtype=torch.float32)
    if alpha > 0:
        ce = cross_entropy(w_student, h_student, targets)
    else:
        with torch.no_grad():
            ce = cross_entropy(w_student.detach(), h_student.detach(), targets)
    total = alpha * ce + (1.0 - alpha) * temperature**2 * kd
    return {'total': total.float(), 'ce': ce.detach().float(), 'kd': kd.detach().float()}

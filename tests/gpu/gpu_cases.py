"""The cases of the GPU smoke suite (issue 19 §2), in the order ``benchmarks/gpu_smoke.py`` runs them."""

from typing import Callable, NamedTuple

import torch
from gpu_common import Report, Sizes
from gpu_loss_cases import g1_autocast, g2_fused_vs_logits, g3_liger
from gpu_model_cases import g4_fsdp, g5_precompute_topk

__all__ = ['CASES', 'Case']


class Case(NamedTuple):
    title: str
    fn: Callable[[Sizes, torch.device], Report]


CASES: dict[str, Case] = {
    'G1': Case('dense, top-k and fused losses and eval sums under bf16 autocast vs fp32', g1_autocast),
    'G2': Case('fused vs logits path (fp32 student head, bf16 teacher head) and the chunk-size sweep',
               g2_fused_vs_logits),
    'G3': Case('Liger vs our fused path (fp32 accumulation) and the jsd endpoints', g3_liger),
    'G4': Case('FSDP1 and FSDP2 in one process, PURE, amp_bf16: two steps vs the unwrapped run; inv_freq fp32',
               g4_fsdp),
    'G5': Case('precompute-teacher top-k on bf16 logits vs the teacher forward', g5_precompute_topk),
}

"""Distillation losses: pure functions on tensors (dense and top-k hybrid losses, the fused LM-head loss, teacher
ensembles, their chunked evaluation, divergences)."""

from composer_kd.losses.arguments import check_distillation_args as check_distillation_args
from composer_kd.losses.arguments import scored_positions as scored_positions
from composer_kd.losses.dense import distillation_loss as distillation_loss
from composer_kd.losses.divergences import DIVERGENCES as DIVERGENCES
from composer_kd.losses.ensemble import ENSEMBLE_MODES as ENSEMBLE_MODES
from composer_kd.losses.ensemble import check_ensemble_weights as check_ensemble_weights
from composer_kd.losses.ensemble import ensemble_teacher_logits as ensemble_teacher_logits
from composer_kd.losses.fused import LinearHead as LinearHead
from composer_kd.losses.fused import fused_distillation_loss as fused_distillation_loss
from composer_kd.losses.topk import TopKTeacher as TopKTeacher
from composer_kd.losses.topk import topk_distillation_loss as topk_distillation_loss

__all__ = [
    'DIVERGENCES', 'ENSEMBLE_MODES', 'LinearHead', 'TopKTeacher', 'check_distillation_args', 'check_ensemble_weights',
    'distillation_loss', 'ensemble_teacher_logits', 'fused_distillation_loss', 'scored_positions',
    'topk_distillation_loss'
]

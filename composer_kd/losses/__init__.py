"""Distillation losses: pure functions on tensors (dense and top-k hybrid losses, the fused LM-head loss, teacher
ensembles, their chunked evaluation, divergences).

The re-exported names load on first use (PEP 562), so ``composer_kd.losses.settings`` (plain Python) can check a
config before anything imports torch.
"""

from typing import TYPE_CHECKING

from composer_kd.lazy_exports import lazy_exports

_EXPORTS = {
    'check_distillation_args': 'composer_kd.losses.settings',
    'check_ensemble_weights': 'composer_kd.losses.settings',
    'ENSEMBLE_MODES': 'composer_kd.losses.settings',
    'scored_positions': 'composer_kd.losses.arguments',
    'distillation_loss': 'composer_kd.losses.dense',
    'DIVERGENCES': 'composer_kd.losses.divergences',
    'ensemble_teacher_logits': 'composer_kd.losses.ensemble',
    'LinearHead': 'composer_kd.losses.fused',
    'fused_distillation_loss': 'composer_kd.losses.fused',
    'TopKTeacher': 'composer_kd.losses.topk',
    'topk_distillation_loss': 'composer_kd.losses.topk',
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # what type checkers and IDEs see
    from composer_kd.losses.arguments import scored_positions as scored_positions
    from composer_kd.losses.dense import distillation_loss as distillation_loss
    from composer_kd.losses.divergences import DIVERGENCES as DIVERGENCES
    from composer_kd.losses.ensemble import ensemble_teacher_logits as ensemble_teacher_logits
    from composer_kd.losses.fused import LinearHead as LinearHead
    from composer_kd.losses.fused import fused_distillation_loss as fused_distillation_loss
    from composer_kd.losses.settings import ENSEMBLE_MODES as ENSEMBLE_MODES
    from composer_kd.losses.settings import check_distillation_args as check_distillation_args
    from composer_kd.losses.settings import check_ensemble_weights as check_ensemble_weights
    from composer_kd.losses.topk import TopKTeacher as TopKTeacher
    from composer_kd.losses.topk import topk_distillation_loss as topk_distillation_loss


__getattr__, __dir__ = lazy_exports(globals(), _EXPORTS)

"""composer-kd: knowledge distillation for language models as a MosaicML Composer plugin.

The public names load on first use (PEP 562), so ``composer-kd --help`` and ``import composer_kd`` do not pay for
torch, Composer and transformers; ``from composer_kd import DistillationModel`` works as usual.
"""

from typing import TYPE_CHECKING

from composer_kd.lazy_exports import lazy_exports

__version__ = '0.1.0'

# public name -> the module that defines it
_EXPORTS = {
    'token_data_spec': 'composer_kd.data.tokens',
    'ConfigError': 'composer_kd.errors',
    'distillation_loss': 'composer_kd.losses.dense',
    'DIVERGENCES': 'composer_kd.losses.divergences',
    'ensemble_teacher_logits': 'composer_kd.losses.ensemble',
    'LinearHead': 'composer_kd.losses.fused',
    'fused_distillation_loss': 'composer_kd.losses.fused',
    'hidden_state_loss': 'composer_kd.losses.hidden_states',
    'TopKTeacher': 'composer_kd.losses.topk',
    'topk_distillation_loss': 'composer_kd.losses.topk',
    'DistillationModel': 'composer_kd.model.distillation_model',
    'HiddenStateDistillation': 'composer_kd.model.hidden_state_taps',
    'cut_model': 'composer_kd.model.layer_pruning',
    'TeacherDivergenceLoss': 'composer_kd.model.metrics',
    'TeacherTop1Agreement': 'composer_kd.model.metrics',
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # what type checkers and IDEs see
    from composer_kd.data.tokens import token_data_spec as token_data_spec
    from composer_kd.errors import ConfigError as ConfigError
    from composer_kd.losses.dense import distillation_loss as distillation_loss
    from composer_kd.losses.divergences import DIVERGENCES as DIVERGENCES
    from composer_kd.losses.ensemble import ensemble_teacher_logits as ensemble_teacher_logits
    from composer_kd.losses.fused import LinearHead as LinearHead
    from composer_kd.losses.fused import fused_distillation_loss as fused_distillation_loss
    from composer_kd.losses.hidden_states import hidden_state_loss as hidden_state_loss
    from composer_kd.losses.topk import TopKTeacher as TopKTeacher
    from composer_kd.losses.topk import topk_distillation_loss as topk_distillation_loss
    from composer_kd.model.distillation_model import DistillationModel as DistillationModel
    from composer_kd.model.hidden_state_taps import HiddenStateDistillation as HiddenStateDistillation
    from composer_kd.model.layer_pruning import cut_model as cut_model
    from composer_kd.model.metrics import TeacherDivergenceLoss as TeacherDivergenceLoss
    from composer_kd.model.metrics import TeacherTop1Agreement as TeacherTop1Agreement


__getattr__, __dir__ = lazy_exports(globals(), _EXPORTS)

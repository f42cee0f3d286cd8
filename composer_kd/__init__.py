"""composer-kd: knowledge distillation for language models as a MosaicML Composer plugin."""

from composer_kd.data.tokens import token_data_spec as token_data_spec
from composer_kd.errors import ConfigError as ConfigError
from composer_kd.losses.dense import distillation_loss as distillation_loss
from composer_kd.losses.divergences import DIVERGENCES as DIVERGENCES
from composer_kd.losses.ensemble import ensemble_teacher_logits as ensemble_teacher_logits
from composer_kd.losses.fused import LinearHead as LinearHead
from composer_kd.losses.fused import fused_distillation_loss as fused_distillation_loss
from composer_kd.losses.topk import TopKTeacher as TopKTeacher
from composer_kd.losses.topk import topk_distillation_loss as topk_distillation_loss
from composer_kd.model.distillation_model import DistillationModel as DistillationModel
from composer_kd.model.metrics import TeacherDivergenceLoss as TeacherDivergenceLoss
from composer_kd.model.metrics import TeacherTop1Agreement as TeacherTop1Agreement

__version__ = '0.1.0'

__all__ = [
    'DIVERGENCES',
    'ConfigError',
    'DistillationModel',
    'LinearHead',
    'TeacherDivergenceLoss',
    'TeacherTop1Agreement',
    'TopKTeacher',
    'distillation_loss',
    'ensemble_teacher_logits',
    'fused_distillation_loss',
    'token_data_spec',
    'topk_distillation_loss',
]

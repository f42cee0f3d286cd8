"""``DistillationModel`` (a Composer ``HuggingFaceModel``) and what it needs: metrics, vocabulary checks, FSDP."""

from composer_kd.model.distillation_model import DistillationModel as DistillationModel
from composer_kd.model.metrics import TeacherDivergenceLoss as TeacherDivergenceLoss
from composer_kd.model.metrics import TeacherTop1Agreement as TeacherTop1Agreement

__all__ = ['DistillationModel', 'TeacherDivergenceLoss', 'TeacherTop1Agreement']

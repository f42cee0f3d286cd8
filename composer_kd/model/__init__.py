"""``DistillationModel`` (a Composer ``HuggingFaceModel``) and what it needs: metrics, vocabulary checks, FSDP, the
LM-head split of the fused loss."""

from composer_kd.model.distillation_model import DistillationModel as DistillationModel
from composer_kd.model.head_tap import HeadTap as HeadTap
from composer_kd.model.metrics import TeacherDivergenceLoss as TeacherDivergenceLoss
from composer_kd.model.metrics import TeacherTop1Agreement as TeacherTop1Agreement

__all__ = ['DistillationModel', 'HeadTap', 'TeacherDivergenceLoss', 'TeacherTop1Agreement']

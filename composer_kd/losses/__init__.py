"""Distillation losses: pure functions on tensors (the dense hybrid loss, its chunked evaluation, divergences)."""

from composer_kd.losses.dense import check_distillation_args as check_distillation_args
from composer_kd.losses.dense import distillation_loss as distillation_loss
from composer_kd.losses.dense import scored_positions as scored_positions
from composer_kd.losses.divergences import DIVERGENCES as DIVERGENCES

__all__ = ['DIVERGENCES', 'check_distillation_args', 'distillation_loss', 'scored_positions']

"""Composer callbacks (and a CSV logger) that Composer itself does not ship, or ships without what we need."""

from composer_kd.callbacks.csv_logger import CSVLogger as CSVLogger
from composer_kd.callbacks.early_stopper import StatefulEarlyStopper as StatefulEarlyStopper
from composer_kd.callbacks.hf_checkpointer import HuggingFaceCheckpointer as HuggingFaceCheckpointer
from composer_kd.callbacks.kd_monitor import KDMonitor as KDMonitor
from composer_kd.callbacks.kd_schedule import KDSchedule as KDSchedule
from composer_kd.callbacks.nonfinite_guard import NonFiniteGuard as NonFiniteGuard
from composer_kd.callbacks.on_policy import OnPolicyDistillation as OnPolicyDistillation
from composer_kd.callbacks.per_sample_log import PerSampleLog as PerSampleLog
from composer_kd.callbacks.release_streaming import ReleaseStreamingMemory as ReleaseStreamingMemory
from composer_kd.callbacks.scheduled_gc import ScheduledGarbageCollector as ScheduledGarbageCollector
from composer_kd.callbacks.sigterm_checkpoint import StopOnSigterm as StopOnSigterm

__all__ = [
    'CSVLogger', 'HuggingFaceCheckpointer', 'KDMonitor', 'KDSchedule', 'NonFiniteGuard', 'OnPolicyDistillation',
    'PerSampleLog',
    'ReleaseStreamingMemory', 'ScheduledGarbageCollector', 'StatefulEarlyStopper', 'StopOnSigterm'
]

"""Composer callbacks that Composer itself does not ship."""

from composer_kd.callbacks.release_streaming import ReleaseStreamingMemory as ReleaseStreamingMemory
from composer_kd.callbacks.scheduled_gc import ScheduledGarbageCollector as ScheduledGarbageCollector

__all__ = ['ReleaseStreamingMemory', 'ScheduledGarbageCollector']

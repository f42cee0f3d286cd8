"""The names a run config can use for optimizers, schedulers, algorithms, callbacks and loggers — LLM Foundry's
spelling — and the class each names, as an import path: checking a name imports nothing; ``resolve`` imports the
class when the run builds it.
"""

from typing import Any, Callable

from composer_kd.lazy_exports import lazy_exports

__all__ = ['REGISTRIES', 'resolve']

REGISTRIES: dict[str, dict[str, str]] = {
    'optimizers': {
        'decoupled_adamw': 'composer.optim:DecoupledAdamW',
        'decoupled_sgdw': 'composer.optim:DecoupledSGDW',
        'adamw': 'torch.optim:AdamW',
    },
    'schedulers': {
        'constant': 'composer.optim:ConstantScheduler',
        'constant_with_warmup': 'composer.optim:ConstantWithWarmupScheduler',
        'cosine': 'composer.optim:CosineAnnealingScheduler',
        'cosine_with_warmup': 'composer.optim:CosineAnnealingWithWarmupScheduler',
        'linear': 'composer.optim:LinearScheduler',
        'linear_decay_with_warmup': 'composer.optim:LinearWithWarmupScheduler',
    },
    'algorithms': {
        'gradient_clipping': 'composer.algorithms:GradientClipping',
        'ema': 'composer.algorithms:EMA',
    },
    'callbacks': {
        'early_stopper': 'composer_kd.callbacks.early_stopper:StatefulEarlyStopper',  # its state checkpointed
        'threshold_stopper': 'composer.callbacks:ThresholdStopper',
        'lr_monitor': 'composer.callbacks:LRMonitor',
        'speed_monitor': 'composer.callbacks:SpeedMonitor',
        'memory_monitor': 'composer.callbacks:MemoryMonitor',
        'runtime_estimator': 'composer.callbacks:RuntimeEstimator',
        'optimizer_monitor': 'composer.callbacks:OptimizerMonitor',
        'nan_monitor': 'composer.callbacks:NaNMonitor',
        'scheduled_gc': 'composer_kd.callbacks.scheduled_gc:ScheduledGarbageCollector',
        'hf_checkpointer': 'composer_kd.callbacks.hf_checkpointer:HuggingFaceCheckpointer',
        'kd_monitor': 'composer_kd.callbacks.kd_monitor:KDMonitor',
        'kd_schedule': 'composer_kd.callbacks.kd_schedule:KDSchedule',
        'per_sample_log': 'composer_kd.callbacks.per_sample_log:PerSampleLog',
    },
    'loggers': {
        'file': 'composer.loggers:FileLogger',
        'csv': 'composer_kd.callbacks.csv_logger:CSVLogger',
        'inmemory': 'composer.loggers:InMemoryLogger',
        'wandb': 'composer.loggers:WandBLogger',
        'mlflow': 'composer.loggers:MLFlowLogger',
        'tensorboard': 'composer.loggers:TensorboardLogger',
    },
}


# Every class by its import path, loaded on first use through the package's one fixed-table importer.
_load, _ = lazy_exports({'__name__': __name__},
                        {path: path.split(':')[0] for names in REGISTRIES.values() for path in names.values()})


def resolve(table: str, name: str) -> Callable[..., Any]:
    """The class (or function) registered as ``name`` in ``table``, imported now."""
    return _load(REGISTRIES[table][name])

"""Names usable in YAML run configs, with LLM Foundry's spelling, mapped to Composer's own classes."""

import inspect
from typing import Any, Callable, Mapping

import torch
from composer import algorithms, callbacks, loggers, optim

from composer_kd.callbacks.csv_logger import CSVLogger
from composer_kd.callbacks.early_stopper import StatefulEarlyStopper
from composer_kd.callbacks.hf_checkpointer import HuggingFaceCheckpointer
from composer_kd.callbacks.kd_monitor import KDMonitor
from composer_kd.callbacks.kd_schedule import KDSchedule
from composer_kd.callbacks.per_sample_log import PerSampleLog
from composer_kd.callbacks.scheduled_gc import ScheduledGarbageCollector
from composer_kd.errors import ConfigError

__all__ = ['OPTIMIZERS', 'SCHEDULERS', 'ALGORITHMS', 'CALLBACKS', 'LOGGERS', 'check_kwargs', 'construct']

OPTIMIZERS: dict[str, Callable[..., Any]] = {
    'decoupled_adamw': optim.DecoupledAdamW,
    'decoupled_sgdw': optim.DecoupledSGDW,
    'adamw': torch.optim.AdamW,
}

SCHEDULERS: dict[str, Callable[..., Any]] = {
    'constant': optim.ConstantScheduler,
    'constant_with_warmup': optim.ConstantWithWarmupScheduler,
    'cosine': optim.CosineAnnealingScheduler,
    'cosine_with_warmup': optim.CosineAnnealingWithWarmupScheduler,
    'linear': optim.LinearScheduler,
    'linear_decay_with_warmup': optim.LinearWithWarmupScheduler,
}

ALGORITHMS: dict[str, Callable[..., Any]] = {
    'gradient_clipping': algorithms.GradientClipping,
    'ema': algorithms.EMA,
}

CALLBACKS: dict[str, Callable[..., Any]] = {
    'early_stopper': StatefulEarlyStopper,  # Composer's EarlyStopper, its state checkpointed
    'threshold_stopper': callbacks.ThresholdStopper,
    'lr_monitor': callbacks.LRMonitor,
    'speed_monitor': callbacks.SpeedMonitor,
    'memory_monitor': callbacks.MemoryMonitor,
    'runtime_estimator': callbacks.RuntimeEstimator,
    'optimizer_monitor': callbacks.OptimizerMonitor,
    'nan_monitor': callbacks.NaNMonitor,
    'scheduled_gc': ScheduledGarbageCollector,
    'hf_checkpointer': HuggingFaceCheckpointer,
    'kd_monitor': KDMonitor,
    'kd_schedule': KDSchedule,
    'per_sample_log': PerSampleLog,
}

LOGGERS: dict[str, Callable[..., Any]] = {
    'file': loggers.FileLogger,
    'csv': CSVLogger,
    'inmemory': loggers.InMemoryLogger,
    'wandb': loggers.WandBLogger,
    'mlflow': loggers.MLFlowLogger,
    'tensorboard': loggers.TensorboardLogger,
}


def check_kwargs(section: str, table: Mapping[str, Callable[..., Any]], name: str, kwargs: Mapping[str, Any]) -> None:
    """Refuses an unknown registered ``name`` or a keyword its class does not take, naming both."""
    if name not in table:
        raise ConfigError(f'{section}: unknown name {name!r}; known: {sorted(table)}')
    params = inspect.signature(table[name]).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    unknown = sorted(set(kwargs or {}) - set(params))
    if unknown:
        allowed = sorted(k for k in params if k not in ('self', 'params'))
        raise ConfigError(f'{section}.{name}: unknown key {unknown[0]!r}; allowed: {allowed}')


def construct(section: str, table: Mapping[str, Callable[..., Any]], name: str, kwargs: Mapping[str, Any],
              *args: Any) -> Any:
    """Builds ``table[name](*args, **kwargs)``, turning a constructor's complaint into a ``ConfigError``.

    Args:
        section (str): the config section, used in messages (e.g. ``callbacks``).
        table (Mapping): registered names → classes.
        name (str): the name in the config.
        kwargs (Mapping): the keyword arguments from the config.
        *args: leading positional arguments supplied by the builder (e.g. optimizer params).
    """
    check_kwargs(section, table, name, kwargs)
    try:
        return table[name](*args, **dict(kwargs or {}))
    except (ValueError, TypeError, ImportError) as e:
        raise ConfigError(f'{section}.{name}: {e}'.splitlines()[0]) from e

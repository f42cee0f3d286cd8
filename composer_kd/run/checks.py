"""Checks of a run config that need no model, data or process group, so a bad value fails in a second —
before anything is loaded or written — and recipes for GPU clusters can be validated on a laptop."""

from dataclasses import fields
from typing import Any, Mapping

from composer.utils import FSDP2Config, FSDPConfig

from composer_kd.errors import ConfigError
from composer_kd.losses import ENSEMBLE_MODES, check_distillation_args, check_ensemble_weights
from composer_kd.losses.liger import jsd_endpoint_refusal
from composer_kd.run.config import model_entries
from composer_kd.run.object_checks import check_registered_objects
from composer_kd.run.registry import ALGORITHMS, CALLBACKS, LOGGERS, OPTIMIZERS, SCHEDULERS, check_kwargs
from composer_kd.run.value_checks import check_loader_values, check_trainer_values

__all__ = [
    'BatchSizes', 'check_ensemble', 'ensemble_mode', 'check_fsdp', 'check_precision', 'check_run_config',
    'has_teacher', 'run_precision', 'eval_metric_names', 'METRIC_DIRECTIONS'
]

# The better direction of each metric the model reports. Composer's EarlyStopper guesses from the name and gets
# LanguageCrossEntropy wrong (it would treat a rising CE as an improvement), so the builder fills in `comp`.
METRIC_DIRECTIONS = {
    'LanguageCrossEntropy': 'lt',
    'LanguagePerplexity': 'lt',
    'TeacherDivergenceLoss': 'lt',
    'TeacherTop1Agreement': 'gt',
}
_TRAIN_METRICS = ['LanguageCrossEntropy', 'LanguagePerplexity']
_PRECISIONS = ('fp32', 'amp_bf16', 'amp_fp16', 'amp_fp8')
_FSDP_KEYS = frozenset(f.name for f in fields(FSDPConfig) if not f.name.startswith('_')) | FSDP2Config.settable_attrs()

BatchSizes = tuple[int, int | str, int]  # device train batch, device microbatch (int or 'auto'), device eval batch


def has_teacher(model: Mapping[str, Any]) -> bool:
    """Whether a ``model:`` section distils from a teacher: a model, an ensemble or precomputed data."""
    return model.get('teacher') is not None or model.get('teachers') is not None


def ensemble_mode(model: Mapping[str, Any]) -> str:
    """``model.distillation.ensemble`` of a ``model:`` section, ``'probs'`` when not given."""
    return (model.get('distillation') or {}).get('ensemble', 'probs')


def check_ensemble(model: Mapping[str, Any]) -> list[float]:
    """The normalised weights of ``model.teachers`` (``[1.0]`` for one ``model.teacher``); refuses a bad weight
    or ``model.distillation.ensemble`` value."""
    mode = ensemble_mode(model)
    if mode not in ENSEMBLE_MODES:
        raise ConfigError(f'model.distillation.ensemble={mode!r}: use one of {list(ENSEMBLE_MODES)}')
    teachers = model.get('teachers')
    if teachers is None:
        return [1.0]
    for i, entry in enumerate(teachers):
        try:
            check_ensemble_weights([entry.get('weight', 1.0)], 1)
        except ValueError:
            weight = entry.get('weight')
            raise ConfigError(f'model.teachers.{i}.weight must be a positive number, got {weight!r}') from None
    return check_ensemble_weights([entry.get('weight', 1.0) for entry in teachers], len(teachers))


def eval_metric_names(cfg: Mapping[str, Any]) -> list[str]:
    """Names of the eval metrics a ``DistillationModel`` built from ``cfg['model']`` reports."""
    names = list(_TRAIN_METRICS)
    if has_teacher(cfg['model']):
        names += ['TeacherDivergenceLoss', 'TeacherTop1Agreement']
    return names


def _positive_int(cfg: Mapping[str, Any], key: str, default: Any = None) -> int:
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f'{key} must be a positive integer, got {value!r}')
    return value


def _batch_sizes(cfg: Mapping[str, Any], world_size: int, gpu: bool) -> BatchSizes:
    """LLM Foundry's batch arithmetic, refusing splits that do not divide."""
    global_batch = _positive_int(cfg, 'global_train_batch_size')
    if global_batch % world_size:
        raise ConfigError(f'global_train_batch_size={global_batch} is not divisible by the {world_size} processes')
    device_batch = global_batch // world_size
    microbatch: int | str
    if cfg.get('device_train_microbatch_size') == 'auto':
        if not gpu:
            raise ConfigError("device_train_microbatch_size='auto' needs a GPU; give an integer on CPU")
        microbatch = 'auto'
    else:
        # Like LLM Foundry, a microbatch larger than the device batch is the device batch.
        microbatch = min(_positive_int(cfg, 'device_train_microbatch_size', device_batch), device_batch)
        if device_batch % microbatch:
            raise ConfigError(f'device_train_microbatch_size={microbatch} does not divide the device batch of '
                              f'{device_batch} (global_train_batch_size={global_batch} / {world_size} processes)')
    default_eval = microbatch if isinstance(microbatch, int) else device_batch
    return device_batch, microbatch, _positive_int(cfg, 'device_eval_batch_size', default_eval)


def check_fsdp(cfg: Mapping[str, Any], world_size: int, gpu: bool, fsdp_version: str | None) -> None:
    """Refuses unknown ``fsdp_config`` keys and FSDP1 without CUDA."""
    fsdp_config = cfg.get('fsdp_config')
    if fsdp_config is None:
        return
    unknown = sorted(set(fsdp_config) - _FSDP_KEYS)
    if unknown:  # Composer's FSDPConfig would set any attribute without complaint
        raise ConfigError(f'unknown key fsdp_config.{unknown[0]}; allowed: {sorted(_FSDP_KEYS)}')
    if world_size > 1 and not gpu and fsdp_version != '2':
        raise ConfigError('fsdp_config: FSDP1 needs CUDA; on CPU set FSDP_VERSION=2 in the environment (FSDP2 runs '
                          'on CPU with gloo) or remove fsdp_config to use DDP')


def check_init_devices(cfg: Mapping[str, Any], world_size: int, gpu: bool) -> None:
    """``init_device: mixed`` / ``meta`` need FSDP to fill the empty weights (and ``meta`` a GPU)."""
    for key, section in model_entries(cfg['model']):
        device = section.get('init_device', 'cpu')
        if device == 'cpu' or (device == 'mixed' and world_size == 1):
            continue
        if world_size == 1 or cfg.get('fsdp_config') is None:
            raise ConfigError(f'{key}.init_device: {device} needs fsdp_config and more than one process (FSDP fills '
                              'the ranks\' empty weights); use init_device: cpu')
        if device == 'meta' and not gpu:
            raise ConfigError(f'{key}.init_device: meta needs CUDA (Composer 0.32.1 initialises meta weights on the '
                              'GPU); on CPU use init_device: mixed or cpu')


def _check_callbacks(cfg: Mapping[str, Any]) -> None:
    for name, kwargs in (cfg.get('callbacks') or {}).items():
        kwargs = kwargs or {}
        check_kwargs('callbacks', CALLBACKS, name, kwargs)
        if name in ('kd_monitor', 'kd_schedule'):
            _check_kd_callback(cfg, name, kwargs)
        if name not in ('early_stopper', 'threshold_stopper'):
            continue
        label = kwargs.get('dataloader_label', 'eval')
        if label not in ('train', 'eval'):
            raise ConfigError(f"callbacks.{name}.dataloader_label={label!r}: use 'eval' or 'train'")
        if label == 'eval' and cfg.get('eval_loader') is None:
            raise ConfigError(f"callbacks.{name}.dataloader_label='eval' needs an eval_loader")
        names = eval_metric_names(cfg) if label == 'eval' else _TRAIN_METRICS
        if kwargs.get('monitor') not in names:
            raise ConfigError(f'callbacks.{name}.monitor={kwargs.get("monitor")!r} is not a metric of this run; '
                              f'choose one of {names}')


def _check_kd_callback(cfg: Mapping[str, Any], name: str, kwargs: Mapping[str, Any]) -> None:
    """Builds the (cheap) callback to check its values; a schedule must fit the model it drives."""
    try:
        CALLBACKS[name](**kwargs)
    except (ValueError, TypeError) as e:
        raise ConfigError(f'callbacks.{name}.{e}'.splitlines()[0]) from e
    if name != 'kd_schedule':
        return
    if kwargs.get('alpha') is not None and not has_teacher(cfg['model']):
        raise ConfigError('callbacks.kd_schedule.alpha: there is no teacher, so alpha stays 1')
    if kwargs.get('temperature') is not None and (cfg['model'].get('teacher') or {}).get('precomputed'):
        raise ConfigError('callbacks.kd_schedule.temperature: a precomputed teacher fixes the temperature (its rest '
                          'mass is recorded at model.distillation.temperature only)')


def run_precision(cfg: Mapping[str, Any], gpu: bool) -> str:
    """The run's precision: as configured, else LLM Foundry's ``amp_bf16`` on GPU and ``fp32`` on CPU."""
    return cfg.get('precision', 'amp_bf16' if gpu else 'fp32')


def check_precision(cfg: Mapping[str, Any], gpu: bool) -> str:
    """The run's precision, refused if unknown or if it needs a GPU this machine lacks."""
    precision = run_precision(cfg, gpu)
    if precision not in _PRECISIONS:
        raise ConfigError(f'precision={precision!r}: use one of {list(_PRECISIONS)}')
    if not gpu and precision != 'fp32':
        raise ConfigError(f'precision={precision!r} needs a GPU; this machine has none, use precision: fp32')
    return precision


def check_run_config(cfg: Mapping[str, Any], world_size: int, gpu: bool, fsdp_version: str | None = None) -> BatchSizes:
    """Checks every value that can be checked without loading anything; returns the device batch sizes.

    Args:
        cfg (Mapping): a config from ``composer_kd.config.load_config`` (structure already validated).
        world_size (int): number of processes of the run.
        gpu (bool): whether the run has CUDA devices.
        fsdp_version (str, optional): the ``FSDP_VERSION`` environment variable of the run.

    Raises:
        ConfigError: naming the key and the value.
    """
    check_precision(cfg, gpu)
    check_trainer_values(cfg)
    if cfg.get('autoresume') and not cfg.get('run_name'):
        raise ConfigError('autoresume: true needs a run_name (it names the run whose checkpoints are resumed)')
    sizes = _batch_sizes(cfg, world_size, gpu)
    check_fsdp(cfg, world_size, gpu, fsdp_version)
    check_init_devices(cfg, world_size, gpu)

    distillation = dict(cfg['model'].get('distillation') or {})
    distillation.pop('ensemble', None)
    check_ensemble(cfg['model'])
    fused_head = distillation.pop('fused_head', False)
    if not (isinstance(fused_head, bool) or fused_head == 'liger'):
        raise ConfigError(f'model.distillation.fused_head must be true, false or liger, got {fused_head!r}')
    alpha = distillation.pop('alpha', 0.5 if has_teacher(cfg['model']) else 1.0)
    divergence = distillation.pop('divergence', 'forward_kl')
    try:
        params = check_distillation_args(alpha, distillation.pop('temperature', 1.0), divergence, distillation)
    except ValueError as e:
        raise ConfigError(f'model.distillation.{e}') from e
    endpoint = jsd_endpoint_refusal(divergence, params) if fused_head == 'liger' else None
    if endpoint is not None:
        raise ConfigError(f'model.distillation.beta={distillation["beta"]!r} with fused_head: liger: {endpoint}')
    if not has_teacher(cfg['model']) and alpha != 1.0:
        raise ConfigError(f'model.distillation.alpha is {alpha!r} but there is no model.teacher; training without a '
                          'teacher needs alpha: 1')

    for section, table in (('optimizer', OPTIMIZERS), ('scheduler', SCHEDULERS)):
        if cfg.get(section) is not None:
            kwargs = {k: v for k, v in cfg[section].items() if k != 'name'}
            check_kwargs(section, table, cfg[section]['name'], kwargs)
    for section, table in (('algorithms', ALGORITHMS), ('loggers', LOGGERS)):
        for name, kwargs in (cfg.get(section) or {}).items():
            check_kwargs(section, table, name, kwargs or {})
    _check_callbacks(cfg)
    for loader in ('train_loader', 'eval_loader'):
        if cfg.get(loader) is not None and cfg[loader].get('name', 'text') not in ('text', 'tokens'):
            raise ConfigError(f"{loader}.name={cfg[loader]['name']!r}: only MDS token data ('text') is supported")
        if cfg.get(loader) is not None:
            check_loader_values(cfg, loader)
    check_registered_objects(cfg)
    return sizes

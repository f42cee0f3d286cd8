"""A validated run config → a Composer ``Trainer``. Every user error surfaces as a ``ConfigError`` before the
``Trainer`` exists, so a bad config leaves nothing in ``save_folder``."""

import logging
import os
from typing import Any, Mapping

import torch
from composer import Trainer
from composer.core import Evaluator
from composer.utils import dist, get_device, reproducibility

from composer_kd.data import build_token_dataloader
from composer_kd.errors import ConfigError
from composer_kd.hf_loading import build_distillation_model, build_tokenizer
from composer_kd.registry import ALGORITHMS, CALLBACKS, LOGGERS, OPTIMIZERS, SCHEDULERS, construct

__all__ = ['build_trainer', 'train']

log = logging.getLogger(__name__)

# Better direction of each metric the model reports. Composer's EarlyStopper guesses from the name and gets
# LanguageCrossEntropy wrong (it would treat a rising CE as improvement).
METRIC_DIRECTIONS = {
    'LanguageCrossEntropy': 'lt',
    'LanguagePerplexity': 'lt',
    'TeacherDivergenceLoss': 'lt',
    'TeacherTop1Agreement': 'gt',
}

_TRAINER_PASSTHROUGH = (
    'run_name', 'max_duration', 'eval_interval', 'eval_subset_num_batches', 'train_subset_num_batches', 'save_folder',
    'save_interval', 'save_num_checkpoints_to_keep', 'save_overwrite', 'save_filename', 'save_latest_filename',
    'save_weights_only', 'load_path', 'load_weights_only', 'load_strict_model_weights', 'autoresume', 'progress_bar',
    'log_to_console', 'console_log_interval', 'dist_timeout')


def _positive_int(cfg: Mapping[str, Any], key: str, default: Any = None) -> int:
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f'{key} must be a positive integer, got {value!r}')
    return value


def _batch_sizes(cfg: Mapping[str, Any], world_size: int) -> tuple[int, int, int]:
    """(device train batch, device microbatch, device eval batch), LLM Foundry's batch arithmetic."""
    global_batch = _positive_int(cfg, 'global_train_batch_size')
    if global_batch % world_size:
        raise ConfigError(f'global_train_batch_size={global_batch} is not divisible by the {world_size} processes')
    device_batch = global_batch // world_size
    if cfg.get('device_train_microbatch_size') == 'auto':
        if not torch.cuda.is_available():
            raise ConfigError("device_train_microbatch_size='auto' needs a GPU; give an integer on CPU")
        microbatch = device_batch
    else:
        microbatch = _positive_int(cfg, 'device_train_microbatch_size', device_batch)
        if device_batch % microbatch:
            raise ConfigError(f'device_train_microbatch_size={microbatch} does not divide the device batch of '
                              f'{device_batch} (global_train_batch_size={global_batch} / {world_size} processes)')
    eval_batch = _positive_int(cfg, 'device_eval_batch_size', microbatch)
    return device_batch, microbatch, eval_batch


def _parallelism(cfg: Mapping[str, Any], world_size: int, device: str) -> dict[str, Any] | None:
    fsdp_config = cfg.get('fsdp_config')
    if fsdp_config is None:
        return None
    if world_size == 1:
        log.warning('fsdp_config is set but this is a single-process run: FSDP does not apply, training without it.')
        return None
    if device == 'cpu' and os.environ.get('FSDP_VERSION') != '2':
        raise ConfigError('fsdp_config: FSDP1 needs CUDA; on CPU set FSDP_VERSION=2 in the environment (FSDP2 runs '
                          'on CPU with gloo) or remove fsdp_config to use DDP')
    return {'fsdp': dict(fsdp_config)}


def _named(section: str, cfg: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    kwargs = dict(cfg[section])
    return kwargs.pop('name'), kwargs


def _callbacks(cfg: Mapping[str, Any], eval_metric_names: list[str], has_eval: bool) -> list[Any]:
    built = []
    for name, kwargs in (cfg.get('callbacks') or {}).items():
        kwargs = dict(kwargs or {})
        if name in ('early_stopper', 'threshold_stopper'):
            monitor, label = kwargs.get('monitor'), kwargs.get('dataloader_label', 'eval')
            names = eval_metric_names if label != 'train' else ['LanguageCrossEntropy', 'LanguagePerplexity']
            if label not in ('train', 'eval'):
                raise ConfigError(f"callbacks.{name}.dataloader_label={label!r}: use 'eval' or 'train'")
            if label == 'eval' and not has_eval:
                raise ConfigError(f"callbacks.{name}.dataloader_label='eval' needs an eval_loader")
            if monitor not in names:
                raise ConfigError(f'callbacks.{name}.monitor={monitor!r} is not a metric of this run; choose one of '
                                  f'{names}')
            kwargs.setdefault('comp', METRIC_DIRECTIONS[monitor])
            kwargs['dataloader_label'] = label
        built.append(construct('callbacks', CALLBACKS, name, kwargs))
    return built


def build_trainer(cfg: Mapping[str, Any]) -> Trainer:
    """Builds the ``Trainer`` for a config returned by ``composer_kd.config.load_config``.

    Raises:
        ConfigError: for any value that cannot be used, naming its key.
    """
    logging.basicConfig(format='%(asctime)s %(levelname)s %(name)s: %(message)s')
    level = str(cfg.get('python_log_level', 'warning')).upper()
    for name in ('composer', 'composer_kd'):
        logging.getLogger(name).setLevel(level)

    device = 'gpu' if torch.cuda.is_available() else 'cpu'
    precision = cfg.get('precision', 'amp_bf16' if device == 'gpu' else 'fp32')
    if device == 'cpu' and precision != 'fp32':
        raise ConfigError(f'precision={precision!r} needs a GPU; this machine has none, use precision: fp32')
    if cfg.get('autoresume') and not cfg.get('run_name'):
        raise ConfigError('autoresume: true needs a run_name (it names the run whose checkpoints are resumed)')

    world_size = int(os.environ.get('WORLD_SIZE', '1'))
    device_batch, microbatch, eval_batch = _batch_sizes(cfg, world_size)
    parallelism_config = _parallelism(cfg, world_size, device)
    seed = cfg.get('seed', 17)
    dist.initialize_dist(get_device(device), timeout=float(cfg.get('dist_timeout', 600)))
    reproducibility.seed_all(seed)  # the same fresh-model init on every rank

    tokenizer = build_tokenizer(cfg['tokenizer'])
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)

    def loader(section: str, batch_size: int) -> Any:
        loader_cfg = {k: v for k, v in cfg[section].items() if k != 'name'}
        if cfg[section].get('name', 'text') not in ('text', 'tokens'):
            raise ConfigError(f"{section}.name={cfg[section]['name']!r}: only MDS token data ('text') is supported")
        dataset = loader_cfg.pop('dataset')
        try:
            return build_token_dataloader(dataset, batch_size, pad_token_id, **loader_cfg)
        except (ValueError, TypeError, FileNotFoundError) as e:
            raise ConfigError(f'{section}: {str(e).splitlines()[0]}') from e

    train_spec = loader('train_loader', device_batch)
    eval_spec = loader('eval_loader', eval_batch) if cfg.get('eval_loader') is not None else None

    model = build_distillation_model(cfg['model'], tokenizer)
    optimizer_name, optimizer_kwargs = _named('optimizer', cfg)
    student_params = [p for p in model.model.parameters() if p.requires_grad]
    optimizer = construct('optimizer', OPTIMIZERS, optimizer_name, optimizer_kwargs, student_params)
    schedulers = [construct('scheduler', SCHEDULERS, *_named('scheduler', cfg))] if cfg.get('scheduler') else []
    algorithms = [construct('algorithms', ALGORITHMS, n, kw) for n, kw in (cfg.get('algorithms') or {}).items()]
    loggers = [construct('loggers', LOGGERS, n, kw) for n, kw in (cfg.get('loggers') or {}).items()]
    eval_metric_names = list(model.get_metrics(is_train=False))
    callbacks = _callbacks(cfg, eval_metric_names, eval_spec is not None)
    evaluators = Evaluator(label='eval', dataloader=eval_spec, metric_names=eval_metric_names) if eval_spec else None

    trainer_kwargs = {k: cfg[k] for k in _TRAINER_PASSTHROUGH if k in cfg}
    try:
        return Trainer(model=model,
                       train_dataloader=train_spec,
                       eval_dataloader=evaluators,
                       optimizers=optimizer,
                       schedulers=schedulers,
                       algorithms=algorithms,
                       callbacks=callbacks,
                       loggers=loggers,
                       device=device,
                       precision=precision,
                       device_train_microbatch_size=microbatch,
                       accumulate_train_batch_on_tokens=cfg.get('accumulate_train_batch_on_tokens', True),
                       parallelism_config=parallelism_config,
                       seed=seed,
                       **trainer_kwargs)
    except ValueError as e:
        raise ConfigError(str(e).splitlines()[0]) from e


def train(cfg: Mapping[str, Any]) -> Trainer:
    """Builds the ``Trainer``, evaluates first if ``eval_first``, fits, and returns it."""
    trainer = build_trainer(cfg)
    if cfg.get('eval_first') and trainer.state.timestamp.batch.value == 0:
        trainer.eval()
    trainer.fit()
    return trainer

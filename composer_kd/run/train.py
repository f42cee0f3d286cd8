"""A validated run config → a Composer ``Trainer``. Every user error surfaces as a ``ConfigError`` before the
``Trainer`` exists, so a bad config leaves nothing in ``save_folder``."""

import errno
import logging
import os
import traceback
from typing import Any, Mapping, Optional

import torch
from composer import Trainer
from composer.core import Evaluator
from composer.utils import dist, format_name_with_dist, get_device, reproducibility

from composer_kd.callbacks import NonFiniteGuard, ReleaseStreamingMemory, StopOnSigterm
from composer_kd.data.tokens import build_token_dataloader
from composer_kd.errors import ConfigError, TrainingFault
from composer_kd.run.checkpoint_repair import repair_checkpoint_folder
from composer_kd.run.checks import METRIC_DIRECTIONS, check_run_config, run_precision
from composer_kd.run.config import model_entries
from composer_kd.run.hf_loading import build_distillation_model, build_tokenizer, check_model_source
from composer_kd.run.model_section import fsdp_settings
from composer_kd.run.precomputed_data import (
    check_precomputed_data,
    check_precomputed_tokenizer,
    distillation_temperature,
    is_precomputed,
)
from composer_kd.run.registry import ALGORITHMS, CALLBACKS, LOGGERS, OPTIMIZERS, SCHEDULERS, construct
from composer_kd.run.value_checks import loader_max_seq_len

__all__ = ['build_trainer', 'check_only', 'train']

log = logging.getLogger(__name__)

_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EIO)

_TRAINER_PASSTHROUGH = (
    'run_name', 'max_duration', 'eval_interval', 'eval_subset_num_batches', 'train_subset_num_batches', 'save_folder',
    'save_interval', 'save_num_checkpoints_to_keep', 'save_overwrite', 'save_filename', 'save_latest_filename',
    'save_weights_only', 'load_path', 'load_weights_only', 'load_strict_model_weights', 'autoresume', 'progress_bar',
    'log_to_console', 'console_log_interval', 'dist_timeout')


def _parallelism(cfg: Mapping[str, Any], world_size: int) -> dict[str, Any] | None:
    """Composer's ``parallelism_config``; like LLM Foundry, a single process runs without FSDP, and
    ``init_device: mixed`` turns on ``sync_module_states`` (FSDP1 needs it said; FSDP2 sees the meta ranks)."""
    if cfg.get('fsdp_config') is None:
        return None
    if world_size == 1:
        log.warning('fsdp_config is set but this is a single-process run: FSDP does not apply, training without it.')
        return None
    return {'fsdp': fsdp_settings(cfg['fsdp_config'], [section for _, section in model_entries(cfg['model'])])}


def _named(section: str, cfg: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    kwargs = dict(cfg[section])
    return kwargs.pop('name'), kwargs


def _callbacks(cfg: Mapping[str, Any]) -> list[Any]:
    built = []
    for name, kwargs in (cfg.get('callbacks') or {}).items():
        kwargs = dict(kwargs or {})
        if name in ('early_stopper', 'threshold_stopper'):  # checked: the monitor is one of our metrics
            kwargs.setdefault('comp', METRIC_DIRECTIONS[kwargs['monitor']])
            kwargs.setdefault('dataloader_label', 'eval')
        built.append(construct('callbacks', CALLBACKS, name, kwargs))
    return built


def _local_checkpoint_folder(cfg: Mapping[str, Any]) -> Optional[str]:
    """The run's local checkpoint folder, when it uses Composer's default checkpoint names (else ``None``)."""
    folder = cfg.get('save_folder')
    default_names = cfg.get('save_filename') is None and cfg.get('save_latest_filename') is None
    if folder is None or '://' in folder or not default_names:
        return None
    return format_name_with_dist(folder, cfg.get('run_name') or '')


def _checkpoint_write_failure(error: BaseException) -> Optional[str]:
    """Why a checkpoint write failed (disk full, quota, read-only, I/O), or ``None`` for another error."""
    in_saver = any(frame.filename.endswith(('checkpoint_saver.py', 'utils/checkpoint.py'))
                   for frame in traceback.extract_tb(error.__traceback__))
    if not in_saver:
        return None
    if isinstance(error, OSError) and error.errno in _WRITE_ERRNOS:
        return os.strerror(error.errno)
    if isinstance(error, RuntimeError) and 'file write failed' in str(error):  # torch.save's C++ writer
        return str(error).splitlines()[0]
    return None


def _check_before_loading(cfg: Mapping[str, Any], world_size: int, gpu: bool, fsdp_version: Optional[str]) -> Any:
    """What ``build_trainer`` and ``train --check`` check before anything loads: every value, the precomputed
    teacher's records, and that local model folders exist. Returns the batch sizes and the precomputed teacher's
    train and eval records (``None`` without one)."""
    sizes = check_run_config(cfg, world_size, gpu, fsdp_version)
    records = check_precomputed_data(cfg) if is_precomputed(cfg) else (None, None)
    for key, section in model_entries(cfg['model']):
        check_model_source(key, section)  # a missing model folder fails now, before any data or model loads
    return sizes, records


def build_trainer(cfg: Mapping[str, Any]) -> Trainer:
    """Builds the ``Trainer`` for a config returned by ``composer_kd.config.load_config``.

    Raises:
        ConfigError: for any value that cannot be used, naming its key.
    """
    gpu = torch.cuda.is_available()
    device = 'gpu' if gpu else 'cpu'
    world_size = int(os.environ.get('WORLD_SIZE', '1'))
    (device_batch, microbatch, eval_batch), (train_teacher, eval_teacher) = _check_before_loading(
        cfg, world_size, gpu, os.environ.get('FSDP_VERSION'))
    logging.basicConfig(format='%(asctime)s %(levelname)s %(name)s: %(message)s')
    level = str(cfg.get('python_log_level', 'warning')).upper()
    for name in ('composer', 'composer_kd'):
        logging.getLogger(name).setLevel(level)
    precomputed = is_precomputed(cfg)
    parallelism_config = _parallelism(cfg, world_size)
    seed = cfg.get('seed', 17)
    dist.initialize_dist(get_device(device), timeout=float(cfg.get('dist_timeout', 600)))
    reproducibility.seed_all(seed)  # the same fresh-model init on every rank
    folder = _local_checkpoint_folder(cfg)
    if cfg.get('autoresume') and folder is not None:
        if dist.get_global_rank() == 0:
            repair_checkpoint_folder(folder)
        dist.barrier()

    tokenizer = build_tokenizer(cfg['tokenizer'])
    for key, meta in (('train_loader.dataset', train_teacher), ('eval_loader.dataset', eval_teacher)):
        if meta is not None:
            check_precomputed_tokenizer(key, meta, tokenizer)
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)

    # A precomputed teacher's batches carry its rest mass at the distillation temperature (checked: recorded).
    teacher_temperature = distillation_temperature(cfg) if precomputed else 1.0

    def loader(section: str, batch_size: int) -> Any:
        loader_cfg = {k: v for k, v in cfg[section].items() if k != 'name'}
        dataset = {**loader_cfg.pop('dataset'), 'max_seq_len': loader_max_seq_len(cfg, section)}
        try:
            return build_token_dataloader(dataset, batch_size, pad_token_id, teacher_temperature=teacher_temperature,
                                          vocab_size=len(tokenizer), **loader_cfg)
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
    callbacks = [*_callbacks(cfg), NonFiniteGuard(cfg.get('on_nonfinite', 'raise')), StopOnSigterm(),
                 ReleaseStreamingMemory()]
    metric_names = list(model.get_metrics(is_train=False))
    if precomputed and eval_teacher is None:  # eval data without the teacher: its metrics cannot be computed
        metric_names = [name for name in metric_names if not name.startswith('Teacher')]
    evaluators = Evaluator(label='eval', dataloader=eval_spec, metric_names=metric_names) if eval_spec else None

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
                       precision=run_precision(cfg, gpu),
                       device_train_microbatch_size=microbatch,
                       accumulate_train_batch_on_tokens=cfg.get('accumulate_train_batch_on_tokens', True),
                       parallelism_config=parallelism_config,
                       seed=seed,
                       **trainer_kwargs)
    except ValueError as e:
        if isinstance(e, OSError):  # io.UnsupportedOperation is both; it is no user error
            raise
        raise ConfigError(str(e).splitlines()[0]) from e


def check_only(cfg: Mapping[str, Any], world_size: int, gpu: bool, fsdp_version: Optional[str]) -> str:
    """``train --check``: every check ``build_trainer`` makes before it loads anything, for a run of
    ``world_size`` processes on GPUs or CPUs; loads no tokenizer, data or model. Returns a summary line.

    Raises:
        ConfigError: naming the key and the value.
    """
    (device_batch, microbatch, eval_batch), _ = _check_before_loading(cfg, world_size, gpu, fsdp_version)
    models = model_entries(cfg['model'])
    sharding = 'FSDP' + ('2' if fsdp_version == '2' else '1') if _parallelism(cfg, world_size) else 'no FSDP'
    teacher = 'precomputed teacher' if is_precomputed(cfg) else f'{len(models) - 1} teacher model(s)'
    return (f'{world_size} {"GPU" if gpu else "CPU"} process(es), {sharding}, precision {run_precision(cfg, gpu)}; '
            f'device batch {device_batch} (microbatch {microbatch}), eval batch {eval_batch}; student and {teacher}; '
            'nothing was loaded')


def train(cfg: Mapping[str, Any]) -> Trainer:
    """Builds the ``Trainer``, evaluates first if ``eval_first``, fits, and returns it. A run that autoresumes
    at its ``max_duration`` is complete: it is returned as loaded (Composer's ``fit`` would refuse it)."""
    trainer = build_trainer(cfg)
    if cfg.get('eval_first') and trainer.state.timestamp.batch.value == 0:
        trainer.eval()
    duration = trainer.state.max_duration
    if duration is not None and trainer.state.timestamp.get(duration.unit) >= duration:
        log.warning('%s is complete (resumed at %s of %s): nothing to train', cfg.get('run_name', 'the run'),
                    trainer.state.timestamp.get(duration.unit), duration)
    else:
        try:
            trainer.fit()
        except BaseException as e:
            trainer.engine.close()  # no event runs when fit raises: callbacks restore state (GC) in close; no barrier
            reason = _checkpoint_write_failure(e) if isinstance(e, (OSError, RuntimeError)) else None
            if reason is None:
                raise
            folder = _local_checkpoint_folder(cfg) or cfg.get('save_folder')
            raise TrainingFault(f'save_folder: a checkpoint could not be written to {folder} ({reason}); the '
                                'checkpoints written before stay loadable: make room and rerun with autoresume: '
                                'true') from e
    return trainer

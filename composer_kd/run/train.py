"""A checked run config → a Composer ``Trainer``. Every user error surfaces as a ``ConfigError`` before the
``Trainer`` exists, so a bad config leaves nothing in ``save_folder``; an error raised while Composer builds the
``Trainer`` (checkpoint loading, FSDP wrapping) is not a config error and keeps its traceback."""

import errno
import logging
import os
import traceback
from typing import Any, Mapping, Optional

import torch
from composer import Trainer
from composer.core import Evaluator
from composer.utils import dist, format_name_with_dist, get_device, reproducibility

from composer_kd.builders.models import build_distillation_model, build_tokenizer
from composer_kd.builders.objects import check_registered_objects, construct
from composer_kd.builders.on_policy import build_on_policy, check_student_fits, prompt_dataloader
from composer_kd.builders.teacher_data import check_precomputed_data, check_precomputed_tokenizer, \
    distillation_temperature
from composer_kd.callbacks import NonFiniteGuard, ReleaseStreamingMemory, StopOnSigterm
from composer_kd.config.model_schema import fsdp_settings
from composer_kd.config.paths import LocalPaths
from composer_kd.config.run_config import validate_run_config
from composer_kd.config.run_rules import METRIC_DIRECTIONS, BatchSizes, check_run_rules, is_precomputed, \
    loader_max_seq_len, model_entries, run_precision
from composer_kd.config.run_schema import trainer_keys
from composer_kd.data.tokens import build_token_dataloader
from composer_kd.errors import TrainingFault
from composer_kd.run.checkpoint_repair import repair_checkpoint_folder
from composer_kd.run.cpu_threads import share_cpu_cores

__all__ = ['build_trainer', 'check_only', 'check_run_config', 'train']

log = logging.getLogger(__name__)

_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EIO)

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
        built.append(construct('callbacks', name, kwargs))
    return built


def _local_checkpoint_folder(cfg: Mapping[str, Any]) -> Optional[str]:
    """The run's local checkpoint folder, when it uses Composer's default checkpoint names (else ``None``)."""
    folder = cfg.get('save_folder')
    default_names = cfg.get('save_filename') is None and cfg.get('save_latest_filename') is None
    if folder is None or '://' in folder or not default_names:
        return None
    return format_name_with_dist(folder, cfg.get('run_name') or '')


def _checkpoint_write_failure(error: BaseException) -> Optional[str]:
    """Why a checkpoint write failed (disk full, quota, read-only, I/O), or ``None`` for another error. Composer has
    no public signal for it: the traceback's frames say whether the error came from its checkpoint writers
    (tests/test_dependency_internals.py checks they still live in these files)."""
    in_saver = any(frame.filename.endswith(('checkpoint_saver.py', 'utils/checkpoint.py'))
                   for frame in traceback.extract_tb(error.__traceback__))
    if not in_saver:
        return None
    if isinstance(error, OSError) and error.errno in _WRITE_ERRNOS:
        return os.strerror(error.errno)
    if isinstance(error, RuntimeError) and 'file write failed' in str(error):  # torch.save's C++ writer
        return str(error).splitlines()[0]
    return None


def check_run_config(cfg: Mapping[str, Any], world_size: int, gpu: bool, fsdp_version: Optional[str] = None,
                     paths: Optional[LocalPaths] = None) -> BatchSizes:
    """Every check of a run config that loads no model, data or tokenizer, for a run of ``world_size`` processes
    on GPUs (``gpu``) or CPUs: the schema, the rules between keys (``config/``), and the registered objects'
    arguments against their classes. Returns the device batch sizes.

    Raises:
        ConfigError: naming the key and the value.
    """
    validate_run_config(cfg)
    sizes = check_run_rules(cfg, world_size, gpu, fsdp_version, paths)
    check_registered_objects(cfg)
    return sizes


def build_trainer(cfg: Mapping[str, Any]) -> Trainer:
    """Builds the ``Trainer`` for a run config (``composer_kd.config.run_config.load_config``, or a dict of
    the same keys: it is checked here too).

    Raises:
        ConfigError: for any value that cannot be used, naming its key.
    """
    gpu = torch.cuda.is_available()
    device = 'gpu' if gpu else 'cpu'
    world_size = int(os.environ.get('WORLD_SIZE', '1'))
    device_batch, microbatch, eval_batch = check_run_config(cfg, world_size, gpu, os.environ.get('FSDP_VERSION'))
    train_teacher, eval_teacher = check_precomputed_data(cfg) if is_precomputed(cfg) else (None, None)
    logging.basicConfig(format='%(asctime)s %(levelname)s %(name)s: %(message)s')
    level = str(cfg.get('python_log_level', 'warning')).upper()
    for name in ('composer', 'composer_kd'):
        logging.getLogger(name).setLevel(level)
    precomputed = is_precomputed(cfg)
    parallelism_config = _parallelism(cfg, world_size)
    seed = cfg.get('seed', 17)
    if not gpu:
        share_cpu_cores()
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

    rollout = build_on_policy(cfg, tokenizer, pad_token_id)

    def loader(section: str, batch_size: int) -> Any:
        if cfg[section].get('name') == 'prompts':
            return prompt_dataloader(cfg, section, batch_size, pad_token_id, len(tokenizer), rollout)
        loader_cfg = {k: v for k, v in cfg[section].items() if k != 'name'}
        dataset = {**loader_cfg.pop('dataset'), 'max_seq_len': loader_max_seq_len(cfg, section)}
        return build_token_dataloader(dataset, batch_size, pad_token_id, teacher_temperature=teacher_temperature,
                                      vocab_size=len(tokenizer), key=section, **loader_cfg)

    train_spec = loader('train_loader', device_batch)
    eval_spec = loader('eval_loader', eval_batch) if cfg.get('eval_loader') is not None else None

    model = build_distillation_model(cfg['model'], tokenizer)
    if rollout is not None:
        check_student_fits(cfg, rollout, model.model)
    # The student's and the hidden-state projections' (the teachers are frozen).
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = construct('optimizer', *_named('optimizer', cfg), trainable)
    schedulers = [construct('scheduler', *_named('scheduler', cfg))] if cfg.get('scheduler') else []
    algorithms = [construct('algorithms', n, kw) for n, kw in (cfg.get('algorithms') or {}).items()]
    loggers = [construct('loggers', n, kw) for n, kw in (cfg.get('loggers') or {}).items()]
    callbacks = [*_callbacks(cfg), NonFiniteGuard(cfg.get('on_nonfinite', 'raise')), StopOnSigterm(),
                 ReleaseStreamingMemory(), *([rollout] if rollout is not None else [])]
    metric_names = list(model.get_metrics(is_train=False))
    if precomputed and eval_teacher is None:  # eval data without the teacher: its metrics cannot be computed
        metric_names = [name for name in metric_names if not name.startswith('Teacher')]
    evaluators = Evaluator(label='eval', dataloader=eval_spec, metric_names=metric_names) if eval_spec else None

    trainer_kwargs = {k: cfg[k] for k in trainer_keys() if k in cfg}
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


def check_only(cfg: Mapping[str, Any], world_size: int, gpu: bool, fsdp_version: Optional[str]) -> list[str]:
    """``train --check``: every check ``build_trainer`` makes before it loads anything, for a run of
    ``world_size`` processes on GPUs or CPUs; loads no tokenizer, data or model. It may run on another machine than
    the run (a laptop, for a cluster recipe): a local path that is not here is listed, not refused.

    Returns:
        list[str]: the report: a summary line, then the local paths not checked here (if any).

    Raises:
        ConfigError: naming the key and the value.
    """
    paths = LocalPaths(elsewhere=True)
    device_batch, microbatch, eval_batch = check_run_config(cfg, world_size, gpu, fsdp_version, paths)
    if is_precomputed(cfg):
        check_precomputed_data(cfg, paths)
    models = model_entries(cfg['model'])
    sharding = 'FSDP' + ('2' if fsdp_version == '2' else '1') if _parallelism(cfg, world_size) else 'no FSDP'
    teacher = 'precomputed teacher' if is_precomputed(cfg) else f'{len(models) - 1} teacher model(s)'
    lines = [f'{world_size} {"GPU" if gpu else "CPU"} process(es), {sharding}, precision {run_precision(cfg, gpu)}; '
             f'device batch {device_batch} (microbatch {microbatch}), eval batch {eval_batch}; student and '
             f'{teacher}; nothing was loaded']
    lines += [f'not checked here: {key} (not on this machine)' for key in paths.not_checked]
    return lines


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

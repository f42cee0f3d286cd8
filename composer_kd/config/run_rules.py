"""The rules between the keys of a run config, for a run of some number of processes on GPUs or CPUs: what
the schema alone cannot say. Plain Python, so a bad config fails in well under a second, before torch loads.

Keyword arguments of registered objects (``optimizer.lr``, a callback's arguments) are checked against their
classes once those are imported (``builders/objects.py``).
"""

import os
from typing import Any, Mapping, Optional

from composer_kd.config.model_schema import check_model_section, init_device
from composer_kd.config.paths import LocalPaths
from composer_kd.errors import ConfigError
from composer_kd.losses.settings import check_distillation_args, check_ensemble_weights

__all__ = [
    'BatchSizes', 'METRIC_DIRECTIONS', 'check_fsdp', 'check_init_devices', 'check_model_rules', 'check_precision',
    'check_run_rules',
    'ensemble_mode', 'ensemble_weights', 'on_policy',
    'eval_metric_names', 'has_teacher', 'is_precomputed', 'loader_max_seq_len', 'model_entries', 'run_precision',
    'teacher_entries'
]

BatchSizes = tuple[int, int | str, int]  # device train batch, device microbatch (int or 'auto'), device eval batch

# The better direction of each metric the model reports. Composer's EarlyStopper guesses from the name and gets
# LanguageCrossEntropy wrong (it would treat a rising CE as an improvement), so the builder fills in `comp`.
METRIC_DIRECTIONS = {
    'LanguageCrossEntropy': 'lt',
    'LanguagePerplexity': 'lt',
    'TeacherDivergenceLoss': 'lt',
    'TeacherTop1Agreement': 'gt',
}
TRAIN_METRICS = ['LanguageCrossEntropy', 'LanguagePerplexity']


def teacher_entries(model: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    """``(key, section)`` of each teacher model a ``model:`` section names — ``model.teacher`` or
    ``model.teachers.0``, ``model.teachers.1``, …; none for no teacher or a precomputed one."""
    if model.get('teachers') is not None:
        return [(f'model.teachers.{i}', entry) for i, entry in enumerate(model['teachers'])]
    teacher = model.get('teacher')
    if teacher is None or teacher.get('precomputed'):
        return []
    return [('model.teacher', teacher)]


def model_entries(model: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    """``(key, section)`` of every model a ``model:`` section builds: ``model.student`` (absent in a precompute
    config), then each teacher model (``teacher_entries``)."""
    student = [('model.student', model['student'])] if model.get('student') is not None else []
    return student + teacher_entries(model)


def has_teacher(model: Mapping[str, Any]) -> bool:
    """Whether a ``model:`` section distils from a teacher: a model, an ensemble or precomputed data."""
    return model.get('teacher') is not None or model.get('teachers') is not None


def is_precomputed(cfg: Mapping[str, Any]) -> bool:
    """Whether the run's teacher is a precomputed dataset rather than a model."""
    return bool((cfg['model'].get('teacher') or {}).get('precomputed'))


def ensemble_mode(model: Mapping[str, Any]) -> str:
    """``model.distillation.ensemble`` of a ``model:`` section, ``'probs'`` when not given."""
    return (model.get('distillation') or {}).get('ensemble', 'probs')


def ensemble_weights(model: Mapping[str, Any]) -> list[float]:
    """The normalised weights of ``model.teachers`` (``[1.0]`` for one ``model.teacher``)."""
    teachers = model.get('teachers')
    if teachers is None:
        return [1.0]
    return check_ensemble_weights([entry.get('weight', 1.0) for entry in teachers], len(teachers))


def eval_metric_names(cfg: Mapping[str, Any]) -> list[str]:
    """Names of the eval metrics a ``DistillationModel`` built from ``cfg['model']`` reports."""
    names = list(TRAIN_METRICS)
    if has_teacher(cfg['model']):
        names += ['TeacherDivergenceLoss', 'TeacherTop1Agreement']
    return names


def run_precision(cfg: Mapping[str, Any], gpu: bool) -> str:
    """The run's precision: as configured, else LLM Foundry's ``amp_bf16`` on GPU and ``fp32`` on CPU."""
    return cfg.get('precision', 'amp_bf16' if gpu else 'fp32')


def check_precision(cfg: Mapping[str, Any], gpu: bool) -> str:
    """The run's precision, refused if it needs a GPU this run lacks."""
    precision = run_precision(cfg, gpu)
    if not gpu and precision != 'fp32':
        raise ConfigError(f'precision={precision!r} needs a GPU; this machine has none, use precision: fp32')
    return precision


def _batch_sizes(cfg: Mapping[str, Any], world_size: int, gpu: bool) -> BatchSizes:
    """LLM Foundry's batch arithmetic, refusing splits that do not divide."""
    global_batch = cfg['global_train_batch_size']
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
        microbatch = min(cfg.get('device_train_microbatch_size', device_batch), device_batch)
        if device_batch % microbatch:
            raise ConfigError(f'device_train_microbatch_size={microbatch} does not divide the device batch of '
                              f'{device_batch} (global_train_batch_size={global_batch} / {world_size} processes)')
    default_eval = microbatch if isinstance(microbatch, int) else device_batch
    return device_batch, microbatch, cfg.get('device_eval_batch_size', default_eval)


def check_fsdp(cfg: Mapping[str, Any], world_size: int, gpu: bool, fsdp_version: Optional[str]) -> None:
    """FSDP1 needs CUDA (Composer 0.32.1 reaches it through CUDA calls)."""
    if cfg.get('fsdp_config') is not None and world_size > 1 and not gpu and fsdp_version != '2':
        raise ConfigError('fsdp_config: FSDP1 needs CUDA; on CPU set FSDP_VERSION=2 in the environment (FSDP2 runs '
                          'on CPU with gloo) or remove fsdp_config to use DDP')


def check_init_devices(cfg: Mapping[str, Any], world_size: int, gpu: bool) -> None:
    """``init_device: mixed`` / ``meta`` need FSDP to fill the empty weights (and ``meta`` a GPU)."""
    for key, section in model_entries(cfg['model']):
        device = init_device(section)
        if device == 'cpu' or (device == 'mixed' and world_size == 1):
            continue
        if world_size == 1 or cfg.get('fsdp_config') is None:
            raise ConfigError(f'{key}.init_device: {device} needs fsdp_config and more than one process (FSDP fills '
                              'the ranks\' empty weights); use init_device: cpu')
        if device == 'meta' and not gpu:
            raise ConfigError(f'{key}.init_device: meta needs CUDA (Composer 0.32.1 initialises meta weights on the '
                              'GPU); on CPU use init_device: mixed or cpu')


def _check_model(cfg: Mapping[str, Any], paths: LocalPaths) -> None:
    model = cfg['model']
    if model.get('teacher') is not None and model.get('teachers') is not None:
        raise ConfigError('model: give model.teacher (one teacher) or model.teachers (an ensemble), not both')
    for key, section in model_entries(model):
        check_model_section(key, section)
        if section.get('pretrained_model_name_or_path') is not None:
            paths.folder(f'{key}.pretrained_model_name_or_path', section['pretrained_model_name_or_path'])
    distillation = dict(model.get('distillation') or {})
    distillation.pop('ensemble', None)
    distillation.pop('on_policy', None)  # its own rules: _check_on_policy
    distillation.pop('hidden_states', None)  # its own rules: _check_hidden_states
    fused_head = distillation.pop('fused_head', False)
    alpha = distillation.pop('alpha', 0.5 if has_teacher(model) else 1.0)
    divergence = distillation.pop('divergence', 'forward_kl')
    try:
        params = check_distillation_args(alpha, distillation.pop('temperature', 1.0), divergence, distillation)
    except ValueError as e:
        raise ConfigError(f'model.distillation.{e}') from e
    if fused_head == 'liger' and divergence == 'jsd' and params['beta'] in (0.0, 1.0):
        kind = 'forward' if params['beta'] == 0.0 else 'reverse'
        raise ConfigError(f'model.distillation.beta={distillation["beta"]!r} with fused_head: liger: jsd with beta '
                          f'{params["beta"]:g} is identically 0 here; Liger computes {kind} KL there: use divergence: '
                          f'{kind}_kl')
    if not has_teacher(model) and alpha != 1.0:
        raise ConfigError(f'model.distillation.alpha is {alpha!r} but there is no model.teacher; training without a '
                          'teacher needs alpha: 1')


def on_policy(cfg: Mapping[str, Any]) -> Optional[dict[str, Any]]:
    """``model.distillation.on_policy`` of a run config, with its defaults filled in (None when it is off); the
    sampling temperature defaults to the loss's."""
    distillation = cfg['model'].get('distillation') or {}
    section = distillation.get('on_policy')
    if section is None:
        return None
    settings = {'fraction': 1.0, 'source_of_rest': 'dataset', 'max_new_tokens': 256, 'top_k': 0, 'top_p': 1.0,
                'allow_temperature_mismatch': False, 'generate_batch_size': None, 'eos_token_ids': None,
                'sample_log': None, **section}
    if settings.get('temperature') is None:
        settings['temperature'] = distillation.get('temperature', 1.0)
    return settings


def _check_on_policy(cfg: Mapping[str, Any]) -> None:
    """On-policy distillation trains on prompts, samples with the loss's temperature unless told otherwise, and needs
    a teacher model (a single one to sample from it); a prompt loader needs on-policy distillation."""
    settings, model = on_policy(cfg), cfg['model']
    for loader in ('train_loader', 'eval_loader'):
        if cfg.get(loader) is not None and cfg[loader].get('name') == 'prompts' and settings is None:
            raise ConfigError(f'{loader}.name: prompts: prompt data is for on-policy distillation; set '
                              'model.distillation.on_policy (or use a token dataset: name: text)')
    if settings is None:
        return
    if cfg['train_loader'].get('name') != 'prompts':
        raise ConfigError('model.distillation.on_policy trains on prompts: set train_loader.name: prompts (a dataset '
                          'from `composer-kd prepare-data --prompts`)')
    if not teacher_entries(model):
        raise ConfigError('model.distillation.on_policy needs a teacher model to grade the samples (model.teacher '
                          'with a model; a precomputed teacher has no scores for new text)')
    if settings['fraction'] < 1.0 and settings['source_of_rest'] == 'teacher' and model.get('teachers') is not None:
        raise ConfigError('model.distillation.on_policy.source_of_rest: teacher samples from one teacher; this run '
                          'has an ensemble (use source_of_rest: dataset)')
    loss_temperature = (model.get('distillation') or {}).get('temperature', 1.0)
    if settings['temperature'] != loss_temperature and not settings['allow_temperature_mismatch']:
        raise ConfigError(f'model.distillation.on_policy.temperature={settings["temperature"]!r} differs from '
                          f'model.distillation.temperature={loss_temperature!r}: the student would be trained on '
                          'samples from another distribution than the one the loss compares; set '
                          'allow_temperature_mismatch: true if that is what you want')


def _check_student_from_teacher(cfg: Mapping[str, Any], paths: LocalPaths) -> None:
    """A student cut from the teacher needs a teacher model to cut — the run's single teacher, or a checkpoint named in
    ``from_teacher`` (the blocks' range is checked when the model is built, its depth known then)."""
    model = cfg['model']
    cut = model['student'].get('from_teacher')
    if cut is None:
        return
    source = cut.get('pretrained_model_name_or_path')
    if source is not None:
        paths.folder('model.student.from_teacher.pretrained_model_name_or_path', source)
    elif model.get('teachers') is not None:
        raise ConfigError('model.student.from_teacher: this run has an ensemble (model.teachers); name the model to '
                          'cut in model.student.from_teacher.pretrained_model_name_or_path')
    elif not teacher_entries(model):
        raise ConfigError('model.student.from_teacher needs a teacher model to cut (model.teacher with a model; a '
                          'precomputed teacher has no weights here), or a checkpoint in '
                          'model.student.from_teacher.pretrained_model_name_or_path')


def _check_hidden_states(cfg: Mapping[str, Any]) -> None:
    """Hidden-state distillation compares the student's blocks with one teacher model's, token by token."""
    model = cfg['model']
    section = (model.get('distillation') or {}).get('hidden_states')
    if section is None:
        return
    if is_precomputed(cfg):
        raise ConfigError('model.distillation.hidden_states needs the teacher model: a precomputed teacher stores its '
                          'top-k log-probabilities, no hidden states')
    if model.get('teachers') is not None:
        raise ConfigError('model.distillation.hidden_states compares the student with one teacher; this run has an '
                          'ensemble (model.teachers)')
    if not teacher_entries(model):
        raise ConfigError('model.distillation.hidden_states needs a teacher model (model.teacher)')
    pairs = section.get('pairs', 'uniform')
    if not isinstance(pairs, str) and not pairs:
        raise ConfigError('model.distillation.hidden_states.pairs=[] pairs nothing; give [[student_block, '
                          'teacher_block], ...] or uniform')
    if not isinstance(pairs, str) and len({tuple(p) for p in pairs}) != len(pairs):
        raise ConfigError(f'model.distillation.hidden_states.pairs={pairs!r} repeats a pair')


def check_model_rules(cfg: Mapping[str, Any], paths: LocalPaths) -> None:
    """The rules of the ``model:`` section alone (``cfg['model']``): its model sections, the loss settings, a
    student cut from the teacher, hidden-state distillation (LLM Foundry's model block is checked with these)."""
    _check_model(cfg, paths)
    _check_student_from_teacher(cfg, paths)
    _check_hidden_states(cfg)


def _check_callbacks(cfg: Mapping[str, Any]) -> None:
    for name, kwargs in (cfg.get('callbacks') or {}).items():
        kwargs = kwargs or {}
        if name == 'kd_schedule':
            if kwargs.get('alpha') is not None and not has_teacher(cfg['model']):
                raise ConfigError('callbacks.kd_schedule.alpha: there is no teacher, so alpha stays 1')
            if kwargs.get('temperature') is not None and is_precomputed(cfg):
                raise ConfigError('callbacks.kd_schedule.temperature: a precomputed teacher fixes the temperature '
                                  '(its rest mass is recorded at model.distillation.temperature only)')
        if name not in ('early_stopper', 'threshold_stopper'):
            continue
        label = kwargs.get('dataloader_label', 'eval')
        if label not in ('train', 'eval'):
            raise ConfigError(f"callbacks.{name}.dataloader_label={label!r}: use 'eval' or 'train'")
        if label == 'eval' and cfg.get('eval_loader') is None:
            raise ConfigError(f"callbacks.{name}.dataloader_label='eval' needs an eval_loader")
        names = eval_metric_names(cfg) if label == 'eval' else TRAIN_METRICS
        if kwargs.get('monitor') not in names:
            raise ConfigError(f'callbacks.{name}.monitor={kwargs.get("monitor")!r} is not a metric of this run; '
                              f'choose one of {names}')


def loader_max_seq_len(cfg: Mapping[str, Any], loader: str) -> int:
    """``{loader}.dataset.max_seq_len``, defaulting to the top-level ``max_seq_len`` (LLM Foundry's ``TrainConfig``
    field); refuses the two disagreeing."""
    dataset = cfg[loader]['dataset']
    top = cfg.get('max_seq_len')
    value = dataset.get('max_seq_len', top)
    if value is None:
        raise ConfigError(f'missing required key {loader}.dataset.max_seq_len (or a top-level max_seq_len)')
    if top is not None and value != top:
        raise ConfigError(f'{loader}.dataset.max_seq_len={value} disagrees with the top-level max_seq_len={top}')
    return value


def _check_loader(cfg: Mapping[str, Any], loader: str, paths: LocalPaths) -> None:
    section = cfg[loader]
    workers = section.get('num_workers', 0)
    if section.get('prefetch_factor') is not None and workers == 0:
        raise ConfigError(f'{loader}.prefetch_factor needs {loader}.num_workers > 0 (it is 0)')
    if section.get('persistent_workers') and workers == 0:
        raise ConfigError(f'{loader}.persistent_workers: true needs {loader}.num_workers > 0 (it is 0)')
    if section.get('name') != 'prompts':  # a prompt's length is its own; the generation budget bounds the rest
        loader_max_seq_len(cfg, loader)
    dataset = section['dataset']
    if dataset.get('remote') is None:
        local, split = dataset.get('local'), dataset.get('split')
        index = os.path.join(local or '', split or '', 'index.json')
        paths.file(f'{loader}.dataset.local', index, f'{loader}: no MDS dataset at local={local!r} split={split!r} '
                   f'(missing {index}); make one with `composer-kd prepare-data`')


def check_run_rules(cfg: Mapping[str, Any], world_size: int, gpu: bool, fsdp_version: Optional[str] = None,
                    paths: Optional[LocalPaths] = None) -> BatchSizes:
    """Every rule between the keys of a run config (whose keys the schema checked) for a run of ``world_size``
    processes on GPUs (``gpu``) or CPUs; returns the device batch sizes.

    Args:
        cfg (Mapping): a config from ``load_config``.
        world_size (int): processes of the run.
        gpu (bool): whether the run has CUDA devices.
        fsdp_version (str, optional): the run's ``FSDP_VERSION`` environment variable.
        paths (LocalPaths, optional): checks the local paths (default: every one must exist here).

    Raises:
        ConfigError: naming the key and the value.
    """
    paths = paths or LocalPaths()
    check_precision(cfg, gpu)
    if cfg.get('autoresume') and not cfg.get('run_name'):
        raise ConfigError('autoresume: true needs a run_name (it names the run whose checkpoints are resumed)')
    sizes = _batch_sizes(cfg, world_size, gpu)
    check_fsdp(cfg, world_size, gpu, fsdp_version)
    check_init_devices(cfg, world_size, gpu)
    _check_on_policy(cfg)
    check_model_rules(cfg, paths)
    paths.folder('tokenizer.name', cfg['tokenizer']['name'])
    _check_callbacks(cfg)
    for loader in ('train_loader', 'eval_loader'):
        if cfg.get(loader) is not None:
            _check_loader(cfg, loader, paths)
    if cfg.get('load_path') is not None:
        paths.file('load_path', cfg['load_path'], f'load_path: no such checkpoint file or folder: {cfg["load_path"]}')
    return sizes

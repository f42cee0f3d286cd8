"""YAML configs of ``train`` and ``precompute-teacher``: OmegaConf loading with ``variables``, interpolation
and dot-list overrides, and a schema check that rejects unknown or missing keys by name before anything is
built.

The layout follows LLM Foundry's ``TrainConfig`` wherever it has one; distillation settings live under
``model:`` so a Foundry user reads the file without surprises. A precompute config shares ``variables``,
``model.teacher``, ``tokenizer``, ``precision`` and ``fsdp_config`` with run configs and adds ``precompute:``.
"""

import os
from typing import Any, Mapping

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from composer_kd.errors import ConfigError
from composer_kd.run.model_section import MODEL_KEYS
from composer_kd.run.recipes import resolve_config_path, shipped_recipes

__all__ = [
    'load_config', 'load_precompute_config', 'model_entries', 'read_yaml', 'teacher_entries', 'validate_config',
    'validate_precompute_config', 'TOP_LEVEL_KEYS', 'REQUIRED_KEYS'
]

REQUIRED_KEYS = ('model', 'tokenizer', 'train_loader', 'optimizer', 'max_duration', 'global_train_batch_size')

TOP_LEVEL_KEYS = frozenset(REQUIRED_KEYS) | {
    'variables', 'run_name', 'seed', 'max_seq_len', 'eval_loader', 'scheduler', 'algorithms', 'callbacks', 'loggers',
    'eval_interval', 'eval_first', 'eval_subset_num_batches', 'train_subset_num_batches',
    'device_train_microbatch_size', 'device_eval_batch_size', 'accumulate_train_batch_on_tokens', 'precision',
    'fsdp_config', 'save_folder',
    'save_interval', 'save_num_checkpoints_to_keep', 'save_overwrite', 'save_filename', 'save_latest_filename',
    'save_weights_only', 'load_path', 'load_weights_only', 'load_strict_model_weights', 'autoresume', 'progress_bar',
    'log_to_console', 'console_log_interval', 'python_log_level', 'dist_timeout', 'on_nonfinite'
}

HF_MODEL_KEYS = MODEL_KEYS  # LLM Foundry's hf_causal_lm keys and ours (run/model_section.py)

_SECTIONS: dict[str, frozenset[str]] = {
    'model': frozenset({'student', 'teacher', 'teachers', 'distillation'}),
    'model.student': HF_MODEL_KEYS,
    'model.teacher': HF_MODEL_KEYS | {'precomputed'},
    'model.teachers.N': HF_MODEL_KEYS | {'weight'},
    'model.distillation': frozenset({'alpha', 'temperature', 'divergence', 'beta', 'lam', 'ensemble', 'fused_head'}),
    'tokenizer': frozenset({'name', 'kwargs'}),
    'train_loader': frozenset({
        'name', 'dataset', 'drop_last', 'num_workers', 'pin_memory', 'prefetch_factor', 'persistent_workers', 'timeout'
    }),
    'train_loader.dataset': frozenset({
        'local', 'remote', 'split', 'max_seq_len', 'shuffle', 'shuffle_seed', 'shuffle_algo', 'shuffle_block_size',
        'predownload', 'download_retry', 'download_timeout', 'validate_hash', 'keep_zip', 'epoch_size', 'cache_limit',
        'partition_algo', 'num_canonical_nodes', 'sampling_method', 'sampling_granularity', 'batching_method'
    }),
}
_SECTIONS['eval_loader'] = _SECTIONS['train_loader']
_SECTIONS['eval_loader.dataset'] = _SECTIONS['train_loader.dataset']

_REQUIRED_IN: dict[str, tuple[str, ...]] = {
    'model': ('student',),
    'tokenizer': ('name',),
    'train_loader': ('dataset',),
    'eval_loader': ('dataset',),
    'optimizer': ('name',),
    'scheduler': ('name',),
}


PRECOMPUTE_REQUIRED_KEYS = ('model', 'tokenizer', 'precompute')
PRECOMPUTE_TOP_LEVEL_KEYS = frozenset(PRECOMPUTE_REQUIRED_KEYS) | {
    'variables', 'run_name', 'seed', 'precision', 'fsdp_config', 'dist_timeout', 'python_log_level'
}
_PRECOMPUTE_SECTIONS: dict[str, frozenset[str]] = {
    'model': frozenset({'teacher', 'teachers', 'distillation'}),
    'model.teacher': HF_MODEL_KEYS,
    'model.teachers.N': _SECTIONS['model.teachers.N'],
    'model.distillation': frozenset({'ensemble'}),
    'tokenizer': _SECTIONS['tokenizer'],
    'precompute': frozenset({
        'dataset', 'out', 'top_k', 'logprobs', 'device_batch_size', 'temperatures', 'samples_per_part', 'progress_bar'
    }),
    'precompute.dataset': frozenset({
        'local', 'remote', 'split', 'max_seq_len', 'download_retry', 'download_timeout', 'validate_hash', 'keep_zip',
        'predownload', 'cache_limit'
    }),
    'precompute.out': frozenset({'local', 'remote', 'compression'}),
}
_PRECOMPUTE_REQUIRED_IN: dict[str, tuple[str, ...]] = {
    'tokenizer': ('name',),
    'precompute': ('dataset', 'out', 'top_k'),
    'precompute.dataset': ('max_seq_len',),
    'precompute.out': ('local',),
}


def load_config(path: str, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """Reads a YAML run config, applies ``key=value`` overrides, resolves interpolation and validates it.

    Raises:
        ConfigError: for a missing or unreadable file, a malformed override, a failed interpolation, or
            any schema violation (see ``validate_config``).
    """
    resolved = read_yaml(path, overrides)
    validate_config(resolved)
    return resolved


def load_precompute_config(path: str, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """``load_config`` for ``precompute-teacher``: the schema of ``validate_precompute_config``."""
    resolved = read_yaml(path, overrides)
    validate_precompute_config(resolved)
    return resolved


def read_yaml(path: str, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """A YAML config with ``key=value`` overrides applied and ``${variables.x}`` resolved; ``variables`` dropped.

    Raises:
        ConfigError: for a missing or unreadable file, a malformed override or a failed interpolation.
    """
    path = resolve_config_path(path)
    if not os.path.isfile(path):
        raise ConfigError(f'config file not found: {path} (shipped recipes, usable by name: '
                          f'{", ".join(shipped_recipes())})')
    try:
        cfg = OmegaConf.load(path)
        for item in overrides:
            if '=' not in item:
                raise ConfigError(f'override {item!r} must look like key=value (e.g. optimizer.lr=1e-4)')
            # One at a time through update, not one merge: a merge cannot reach into lists (model.teachers.1.weight).
            key = item.split('=', 1)[0]
            OmegaConf.update(cfg, key, OmegaConf.select(OmegaConf.from_dotlist([item]), key), force_add=True)
        resolved = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        raise ConfigError(f'{path}: {str(e).splitlines()[0]}') from e
    except Exception as e:  # yaml parse errors come from several libraries
        if isinstance(e, ConfigError):
            raise
        mark = getattr(e, 'problem_mark', None)
        where = f' (line {mark.line + 1}, column {mark.column + 1})' if mark is not None else ''
        problem = getattr(e, 'problem', None) or str(e).splitlines()[0]
        raise ConfigError(f'{path}: cannot parse YAML{where}: {problem}') from e
    if not isinstance(resolved, dict):
        raise ConfigError(f'{path}: a run config must be a mapping of keys, got {type(resolved).__name__}')
    resolved.pop('variables', None)
    return resolved


def _check_section(name: str, value: Any, sections: Mapping[str, frozenset[str]] = _SECTIONS,
                   required: Mapping[str, tuple[str, ...]] = _REQUIRED_IN) -> None:
    if not isinstance(value, Mapping):
        raise ConfigError(f'{name} must be a mapping, got {value!r}')
    allowed = sections.get(name)
    if allowed is not None:
        unknown = sorted(set(value) - allowed)
        if unknown:
            raise ConfigError(f'unknown key {name}.{unknown[0]}; allowed in {name}: {sorted(allowed)}')
    for key in required.get(name, ()):
        if value.get(key) is None:
            raise ConfigError(f'missing required key {name}.{key}')


def _check_top_level(cfg: Mapping[str, Any], allowed: frozenset[str], required: tuple[str, ...]) -> None:
    unknown = sorted(set(cfg) - allowed)
    if unknown:
        raise ConfigError(f'unknown top-level key {unknown[0]!r}; put free values under `variables:` '
                          f'(allowed keys: {sorted(allowed)})')
    for key in required:
        if cfg.get(key) is None:
            raise ConfigError(f'missing required key {key!r}')


def _check_precomputed_teacher(teacher: Mapping[str, Any]) -> None:
    """``model.teacher.precomputed`` is ``true`` or absent (its other keys, if any, name the teacher the data
    must have been precomputed from)."""
    if 'precomputed' in teacher and teacher['precomputed'] is not True:
        raise ConfigError(f'model.teacher.precomputed must be true (leave it out for a teacher model), got '
                          f'{teacher["precomputed"]!r}')


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


def _check_teachers(model: Mapping[str, Any], sections: Mapping[str, frozenset[str]], required: bool) -> None:
    """``model.teacher`` (one) or ``model.teachers`` (a non-empty list of model sections), not both."""
    if model.get('teacher') is not None and model.get('teachers') is not None:
        raise ConfigError('model: give model.teacher (one teacher) or model.teachers (an ensemble), not both')
    if required and model.get('teacher') is None and model.get('teachers') is None:
        raise ConfigError('missing required key model.teacher (or model.teachers for an ensemble)')
    teachers = model.get('teachers')
    if teachers is None:
        return
    if not isinstance(teachers, list) or not teachers:
        raise ConfigError(f'model.teachers must be a non-empty list of teacher models, got {teachers!r}')
    for i, entry in enumerate(teachers):
        _check_section(f'model.teachers.{i}', entry, {f'model.teachers.{i}': sections['model.teachers.N']})


def validate_config(cfg: Mapping[str, Any]) -> None:
    """Checks the structure of a resolved run config: every key known, every required key present.

    Values are checked where the objects are built (``composer_kd.train``), each error naming its key.
    """
    if 'rounds' in cfg:
        raise ConfigError('rounds: this is a multi-round config; run it with `composer-kd rounds`')
    _check_top_level(cfg, TOP_LEVEL_KEYS, REQUIRED_KEYS)
    for section in ('model', 'tokenizer', 'train_loader', 'eval_loader', 'optimizer', 'scheduler'):
        if cfg.get(section) is not None:
            _check_section(section, cfg[section])
    for section in ('model.student', 'model.teacher', 'model.distillation'):
        value = cfg['model'].get(section.split('.')[1])
        if value is not None:
            _check_section(section, value)
    _check_teachers(cfg['model'], _SECTIONS, required=False)
    if cfg['model'].get('teacher') is not None:
        _check_precomputed_teacher(cfg['model']['teacher'])
    for loader in ('train_loader', 'eval_loader'):
        if cfg.get(loader) is not None:
            _check_section(f'{loader}.dataset', cfg[loader]['dataset'])
    for section in ('algorithms', 'callbacks', 'loggers', 'fsdp_config'):
        value = cfg.get(section)
        if value is not None and not isinstance(value, Mapping):
            raise ConfigError(f'{section} must be a mapping of name -> arguments, got {value!r}')


def validate_precompute_config(cfg: Mapping[str, Any]) -> None:
    """Checks the structure of a resolved ``precompute-teacher`` config (values: ``run.precompute_checks``)."""
    _check_top_level(cfg, PRECOMPUTE_TOP_LEVEL_KEYS, PRECOMPUTE_REQUIRED_KEYS)
    for section in ('model', 'tokenizer', 'precompute'):
        _check_section(section, cfg[section], _PRECOMPUTE_SECTIONS, _PRECOMPUTE_REQUIRED_IN)
    _check_teachers(cfg['model'], _PRECOMPUTE_SECTIONS, required=True)
    for section in ('teacher', 'distillation'):
        if cfg['model'].get(section) is not None:
            _check_section(f'model.{section}', cfg['model'][section], _PRECOMPUTE_SECTIONS, _PRECOMPUTE_REQUIRED_IN)
    for section in ('dataset', 'out'):
        _check_section(f'precompute.{section}', cfg['precompute'][section], _PRECOMPUTE_SECTIONS,
                       _PRECOMPUTE_REQUIRED_IN)
    if cfg.get('fsdp_config') is not None and not isinstance(cfg['fsdp_config'], Mapping):
        raise ConfigError(f'fsdp_config must be a mapping of FSDP settings, got {cfg["fsdp_config"]!r}')

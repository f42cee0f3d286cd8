"""``composer-kd eval``'s settings (a YAML and/or flags): the schema, and the checks that need nothing loaded."""

import dataclasses
import os
from typing import Any, Mapping, Optional, Sequence

from composer_kd.config.kinds import AnyOf, Choice, Integer, ListOf, Text
from composer_kd.config.model_schema import DISTILLATION
from composer_kd.config.run_rules import check_precision
from composer_kd.config.run_schema import PRECISIONS
from composer_kd.config.schema import Key, Section, check
from composer_kd.errors import ConfigError
from composer_kd.losses.settings import check_distillation_args

__all__ = ['EVAL_KEYS', 'EVAL_SCHEMA', 'EvalSettings', 'check_eval_settings']

_LOSS = {e.name: e for e in DISTILLATION.entries}
_FOLDER = Text(what='a folder')
EVAL_SCHEMA = Section('', 'composer-kd eval settings (the flags are the same names with dashes).', (
    Key('models', AnyOf(_FOLDER, ListOf(_FOLDER), what='one or more model folders'), 'Hugging Face folders '
        '(students) to evaluate (required).'),
    Key('data', _FOLDER, 'The MDS dataset folder (with split folders).', required=True),
    Key('split', Text(), 'The split to evaluate.', 'val'),
    Key('max_seq_len', Integer(2, what='an integer >= 2'), 'Tokens per sample (required).'),
    Key('teacher', _FOLDER, 'A teacher folder: adds its divergence and top-1 agreement.'),
    Key('tokenizer', _FOLDER, 'The tokenizer folder (default: the first model\'s).'),
    Key('batch_size', Integer(1, what='an integer >= 1'), 'Samples per batch.', 32),
    Key('max_samples', Integer(1, what='an integer >= 1'), 'Evaluate the first N samples (whole batches).'),
    *(_LOSS[name] for name in ('divergence', 'temperature', 'beta', 'lam')),
    Key('precision', Choice(PRECISIONS[:3]), 'fp32, or on a GPU amp_bf16 / amp_fp16 (Composer\'s autocast).', 'fp32',
        refusal='{path}={value!r}: use {what}'),
), unknown_key="unknown key {key!r}{hint}; allowed: {allowed}")
EVAL_KEYS = tuple(e.name for e in EVAL_SCHEMA.entries)


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """What ``evaluate_models`` runs with (folders expanded)."""
    models: list[str]
    data: str
    split: str
    max_seq_len: int
    teacher: Optional[str]
    tokenizer: str
    batch_size: int
    max_samples: Optional[int]
    divergence: str
    temperature: float
    divergence_kwargs: dict[str, float]
    precision: str


def _folder(key: str, value: Any) -> str:
    if not isinstance(value, str) or not os.path.isdir(os.path.expanduser(value)):
        raise ConfigError(f'{key}: {value!r} is not a folder')
    return os.path.expanduser(value)


def check_eval_settings(settings: Mapping[str, Any], gpu: bool) -> EvalSettings:
    """Checks ``composer-kd eval``'s settings; nothing is loaded.

    Raises:
        ConfigError: naming the key and the value.
    """
    check(settings, EVAL_SCHEMA)
    for key in ('max_seq_len', 'models'):  # said as a value error, for the flags' sake (a missing flag is None)
        if settings.get(key) is None:
            what = {'max_seq_len': 'an integer >= 2', 'models': 'one or more model folders'}[key]
            raise ConfigError(f'{key} must be {what}, got None')
    models = settings['models'] if isinstance(settings['models'], Sequence) and not isinstance(
        settings['models'], str) else [settings['models']]
    models = [_folder(f'models.{i}', m) for i, m in enumerate(models)]
    data = _folder('data', settings.get('data'))
    split = settings.get('split') or 'val'
    if not os.path.isfile(os.path.join(data, split, 'index.json')):
        raise ConfigError(f'split: no MDS split {split!r} in {data} (no {split}/index.json)')
    teacher = _folder('teacher', settings['teacher']) if settings.get('teacher') is not None else None
    tokenizer = _folder('tokenizer', settings['tokenizer']) if settings.get('tokenizer') is not None else models[0]
    precision = check_precision({'precision': settings.get('precision') or 'fp32'}, gpu)
    divergence = settings.get('divergence') or 'forward_kl'
    temperature = settings.get('temperature', 1.0)
    divergence_kwargs = {k: settings[k] for k in ('beta', 'lam') if settings.get(k) is not None}
    try:  # alpha weighs the training loss only: any valid value
        divergence_kwargs = {k: v for k, v in check_distillation_args(0.5, temperature, divergence,
                                                                      divergence_kwargs).items() if k in
                             divergence_kwargs}
    except ValueError as e:
        raise ConfigError(str(e)) from e
    return EvalSettings(models, data, split, settings['max_seq_len'], teacher, tokenizer,
                        settings.get('batch_size') or 32, settings.get('max_samples'), divergence, float(temperature),
                        divergence_kwargs, precision)

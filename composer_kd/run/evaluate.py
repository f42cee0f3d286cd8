"""Held-out metrics of saved students, alone or against a teacher: the numbers a distillation report needs
(``composer-kd eval``; the quickstart's report). The metrics are the training run's own (``DistillationModel``'s
eval metrics), so an eval here and an eval during training agree."""

import itertools
import os
from typing import Any, Mapping, Optional, Sequence

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from composer_kd.data.streaming_resources import release_shared_memory
from composer_kd.data.tokens import build_token_dataloader
from composer_kd.errors import ConfigError
from composer_kd.losses import check_distillation_args
from composer_kd.model.distillation_model import DistillationModel

__all__ = ['evaluate_student', 'evaluate_models', 'EVAL_KEYS']


def evaluate_student(student_dir: str,
                     tokenizer_dir: str,
                     data_dir: str,
                     max_seq_len: int,
                     teacher_dir: Optional[str] = None,
                     split: str = 'val',
                     batch_size: int = 32,
                     max_samples: Optional[int] = None,
                     divergence: str = 'forward_kl',
                     temperature: float = 1.0) -> dict[str, float]:
    """Evaluates a ``save_pretrained`` student on the first ``max_samples`` (default: all; rounded up to whole
    batches of ``batch_size``) samples of an MDS split.

    Returns:
        dict[str, float]: ``LanguageCrossEntropy`` and ``LanguagePerplexity``, plus ``TeacherDivergenceLoss``
        (``divergence`` at ``temperature``) and ``TeacherTop1Agreement`` when ``teacher_dir`` is given.
    """
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    student = AutoModelForCausalLM.from_pretrained(student_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir) if teacher_dir else None
    model = DistillationModel(student, teacher, tokenizer, alpha=1.0 if teacher is None else 0.5,
                              divergence=divergence, temperature=temperature).eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    loader = build_token_dataloader({'local': data_dir, 'split': split, 'max_seq_len': max_seq_len, 'shuffle': False},
                                    batch_size, pad, drop_last=False).dataloader
    metrics = model.get_metrics(is_train=False)
    limit = None if max_samples is None else -(-max_samples // batch_size)
    with torch.no_grad():
        for batch in itertools.islice(loader, limit):
            outputs = model.eval_forward(batch)
            for metric in metrics.values():
                model.update_metric(batch, outputs, metric)
    release_shared_memory(loader.dataset)
    return {name: float(metric.compute()) for name, metric in metrics.items()}


# composer-kd eval's settings, by their YAML names (the flags are the same with dashes).
EVAL_KEYS = ('models', 'data', 'split', 'max_seq_len', 'teacher', 'tokenizer', 'batch_size', 'max_samples',
             'divergence', 'temperature')


def _folder(key: str, value: Any) -> str:
    if not isinstance(value, str) or not os.path.isdir(os.path.expanduser(value)):
        raise ConfigError(f'{key}: {value!r} is not a folder')
    return os.path.expanduser(value)


def evaluate_models(settings: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """``composer-kd eval``: every model of ``settings['models']`` (HF folders) on one MDS split, checked first.

    Args:
        settings (Mapping): ``EVAL_KEYS``; ``models``, ``data`` and ``max_seq_len`` are required, ``tokenizer``
            defaults to the first model's folder, ``split`` to ``val``.

    Returns:
        dict: ``{model folder: {metric: value}}``.

    Raises:
        ConfigError: naming the key and the value, before any model loads.
    """
    unknown = sorted(set(settings) - set(EVAL_KEYS))
    if unknown:
        raise ConfigError(f'unknown key {unknown[0]!r}; allowed: {list(EVAL_KEYS)}')
    models = settings.get('models')
    if isinstance(models, str):
        models = [models]
    if not isinstance(models, Sequence) or not models:
        raise ConfigError(f'models must be one or more model folders, got {models!r}')
    models = [_folder(f'models.{i}', m) for i, m in enumerate(models)]
    data = _folder('data', settings.get('data'))
    split = settings.get('split') or 'val'
    if not os.path.isfile(os.path.join(data, split, 'index.json')):
        raise ConfigError(f'split: no MDS split {split!r} in {data} (no {split}/index.json)')
    for key, low in (('max_seq_len', 2), ('batch_size', 1), ('max_samples', 1)):
        value = settings.get(key)
        if (value is not None or key == 'max_seq_len') and (isinstance(value, bool) or not isinstance(value, int)
                                                           or value < low):
            raise ConfigError(f'{key} must be an integer >= {low}, got {value!r}')
    teacher = _folder('teacher', settings['teacher']) if settings.get('teacher') is not None else None
    tokenizer = _folder('tokenizer', settings['tokenizer']) if settings.get('tokenizer') is not None else models[0]
    try:
        check_distillation_args(0.5, settings.get('temperature', 1.0), settings.get('divergence', 'forward_kl'), {})
    except ValueError as e:
        raise ConfigError(str(e)) from e
    return {
        model: evaluate_student(model, tokenizer, data, settings['max_seq_len'], teacher_dir=teacher, split=split,
                                batch_size=settings.get('batch_size') or 32, max_samples=settings.get('max_samples'),
                                divergence=settings.get('divergence', 'forward_kl'),
                                temperature=float(settings.get('temperature', 1.0)))
        for model in models
    }

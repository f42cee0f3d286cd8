"""Held-out metrics of saved students, alone or against a teacher: the numbers a distillation report needs
(``composer-kd eval``; the quickstart's report). The metrics are the training run's own (``DistillationModel``'s
eval metrics, with the run's divergence, temperature, ``beta``/``lam`` and precision), so an eval here and an
eval during training agree. On a machine with a GPU the models run there; the teacher loads once for every
student."""

import itertools
from typing import Any, Mapping, Optional

import torch
from composer.core.precision import get_precision_context
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from composer_kd.data.streaming_resources import release_shared_memory
from composer_kd.data.tokens import build_token_dataloader
from composer_kd.builders.models import check_model_tokenizer
from composer_kd.config.eval_config import check_eval_settings
from composer_kd.errors import ConfigError
from composer_kd.model.distillation_model import DistillationModel

__all__ = ['evaluate_student', 'evaluate_models']


def _device() -> torch.device:
    return torch.device('cuda' if torch.cuda.is_available() else 'cpu')


def _load(folder: str, device: torch.device) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(folder).to(device).eval()


def _metrics(student: PreTrainedModel, teacher: Optional[PreTrainedModel], tokenizer: PreTrainedTokenizerBase,
             data_dir: str, split: str, max_seq_len: int, batch_size: int, max_samples: Optional[int],
             divergence: str, temperature: float, precision: str,
             divergence_kwargs: Mapping[str, float]) -> dict[str, float]:
    """The eval metrics of loaded models (on one device) over the first ``max_samples`` samples (whole batches)."""
    device = next(student.parameters()).device
    try:
        model = DistillationModel(student, teacher, tokenizer, alpha=1.0 if teacher is None else 0.5,
                                  divergence=divergence, temperature=temperature, **divergence_kwargs).eval()
    except ValueError as e:  # the models' vocabularies (shared_vocab_size), as train refuses them
        raise ConfigError(f'models: {e}') from e
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    loader = build_token_dataloader({'local': data_dir, 'split': split, 'max_seq_len': max_seq_len, 'shuffle': False},
                                    batch_size, pad, drop_last=False).dataloader
    metrics = {name: metric.to(device) for name, metric in model.get_metrics(is_train=False).items()}
    limit = None if max_samples is None else -(-max_samples // batch_size)
    with torch.no_grad():
        for batch in itertools.islice(loader, limit):
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            with get_precision_context(precision):  # Composer's eval: forward and metrics in one autocast
                outputs = model.eval_forward(batch)
                for metric in metrics.values():
                    model.update_metric(batch, outputs, metric)
    release_shared_memory(loader.dataset)
    return {name: float(metric.compute()) for name, metric in metrics.items()}


def evaluate_student(student_dir: str,
                     tokenizer_dir: str,
                     data_dir: str,
                     max_seq_len: int,
                     teacher_dir: Optional[str] = None,
                     split: str = 'val',
                     batch_size: int = 32,
                     max_samples: Optional[int] = None,
                     divergence: str = 'forward_kl',
                     temperature: float = 1.0,
                     precision: str = 'fp32',
                     **divergence_kwargs: float) -> dict[str, float]:
    """Evaluates a ``save_pretrained`` student on the first ``max_samples`` (default: all; rounded up to whole
    batches of ``batch_size``) samples of an MDS split, on the GPU when there is one.

    Args:
        precision (str): ``fp32``, or on a GPU ``amp_bf16`` / ``amp_fp16`` (Composer's autocast).
        divergence_kwargs: ``beta`` (jsd) or ``lam`` (skew KLs).

    Returns:
        dict[str, float]: ``LanguageCrossEntropy`` and ``LanguagePerplexity``, plus ``TeacherDivergenceLoss``
        (``divergence`` at ``temperature``) and ``TeacherTop1Agreement`` when ``teacher_dir`` is given.
    """
    device = _device()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    teacher = _load(teacher_dir, device) if teacher_dir else None
    return _metrics(_load(student_dir, device), teacher, tokenizer, data_dir, split, max_seq_len, batch_size,
                    max_samples, divergence, temperature, precision, divergence_kwargs)


def _check_vocabulary(key: str, folder: str, tokenizer: PreTrainedTokenizerBase) -> None:
    """Refuses a model whose own tokenizer maps tokens to other ids, or with fewer output logits than the
    tokenizer has tokens (from its config: nothing loads)."""
    check_model_tokenizer(key, {'pretrained_model_name_or_path': folder}, tokenizer)
    try:
        rows = AutoConfig.from_pretrained(folder).vocab_size
    except (OSError, ValueError) as e:
        raise ConfigError(f'{key}: cannot read the model config in {folder}: {str(e).splitlines()[0]}') from e
    if isinstance(rows, int) and rows < len(tokenizer):
        raise ConfigError(f'{key}: {folder} has {rows} output logits but the tokenizer has {len(tokenizer)} tokens; '
                          'use the tokenizer the models were trained with')


def evaluate_models(settings: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """``composer-kd eval``: every model of ``settings['models']`` (HF folders) on one MDS split, checked first;
    the teacher loads once for all of them.

    Args:
        settings (Mapping): ``config.eval_config.EVAL_KEYS``; ``models``, ``data`` and ``max_seq_len`` are
            required, ``tokenizer`` defaults to the first model's folder, ``split`` to ``val``, ``precision`` to
            ``fp32``; ``divergence``, ``temperature``, ``beta`` and ``lam`` are train's ``model.distillation``
            settings.

    Returns:
        dict: ``{model folder: {metric: value}}``.

    Raises:
        ConfigError: naming the key and the value, before any model loads.
    """
    run = check_eval_settings(settings, torch.cuda.is_available())
    try:
        tokenizer = AutoTokenizer.from_pretrained(run.tokenizer)
    except (OSError, ValueError) as e:  # not a tokenizer folder, or Hugging Face cannot read it
        raise ConfigError(f'tokenizer: cannot load a tokenizer from {run.tokenizer!r}: '
                          f'{str(e).splitlines()[0]}') from e
    named = [(f'models.{i}', m) for i, m in enumerate(run.models)] + ([('teacher', run.teacher)] if run.teacher else [])
    for key, folder in named:
        _check_vocabulary(key, folder, tokenizer)

    device = _device()
    teacher_model = _load(run.teacher, device) if run.teacher else None
    return {
        model: _metrics(_load(model, device), teacher_model, tokenizer, run.data, run.split, run.max_seq_len,
                        run.batch_size, run.max_samples, run.divergence, run.temperature, run.precision,
                        run.divergence_kwargs)
        for model in run.models
    }

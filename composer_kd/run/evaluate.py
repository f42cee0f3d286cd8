"""Held-out metrics of a saved student, alone or against a teacher: the numbers a distillation report needs."""

import itertools
from typing import Optional

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from composer_kd.data.streaming_resources import release_shared_memory
from composer_kd.data.tokens import build_token_dataloader
from composer_kd.model.distillation_model import DistillationModel

__all__ = ['evaluate_student']


def evaluate_student(student_dir: str,
                     tokenizer_dir: str,
                     data_dir: str,
                     max_seq_len: int,
                     teacher_dir: Optional[str] = None,
                     split: str = 'val',
                     batch_size: int = 32,
                     max_samples: Optional[int] = None) -> dict[str, float]:
    """Evaluates a ``save_pretrained`` student on the first ``max_samples`` (default: all; rounded up to whole
    batches of ``batch_size``) samples of an MDS split.

    Returns:
        dict[str, float]: ``LanguageCrossEntropy`` and ``LanguagePerplexity``, plus ``TeacherDivergenceLoss``
        (forward KL at T=1) and ``TeacherTop1Agreement`` when ``teacher_dir`` is given.
    """
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    student = AutoModelForCausalLM.from_pretrained(student_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir) if teacher_dir else None
    model = DistillationModel(student, teacher, tokenizer, alpha=1.0 if teacher is None else 0.5).eval()
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

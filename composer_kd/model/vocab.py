"""Vocabulary checks between a tokenizer, a student and a teacher.

Checkpoints often pad their embedding matrix past the tokenizer (Qwen2: 151,936 or 152,064 rows for a
151,665-token tokenizer) so that matmuls tile well. The rows past ``len(tokenizer)`` are never targets, so
the loss compares the two distributions over the tokenizer's ids only.
"""

from typing import Any, Optional

from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ['shared_vocab_size', 'check_same_vocabulary', 'embedding_rows']


def embedding_rows(model: PreTrainedModel) -> int:
    """Number of output logits the model produces (its output embedding rows)."""
    head = model.get_output_embeddings()
    return int(head.weight.shape[0]) if head is not None else int(model.config.vocab_size)


def shared_vocab_size(student: PreTrainedModel, teacher: Optional[PreTrainedModel],
                      tokenizer: Optional[PreTrainedTokenizerBase]) -> int:
    """The number of leading logits that student and teacher share: ``len(tokenizer)`` when given.

    Raises:
        ValueError: if the tokenizer is longer than either model's embeddings, or if the two models'
            vocabulary sizes differ and no tokenizer says which ids are real.
    """
    student_rows = embedding_rows(student)
    teacher_rows = embedding_rows(teacher) if teacher is not None else None
    if tokenizer is None:
        if teacher_rows is not None and teacher_rows != student_rows:
            raise ValueError(f'student has {student_rows} output logits and teacher has {teacher_rows}; pass the '
                             'tokenizer so both can be cut to its length')
        return student_rows
    size = len(tokenizer)
    for name, rows in (('student', student_rows), ('teacher', teacher_rows)):
        if rows is not None and rows < size:
            raise ValueError(f'the tokenizer has {size} tokens but the {name} has only {rows} embedding rows; '
                             f'use a {name} built for this tokenizer (or resize its embeddings first)')
    return size


def check_same_vocabulary(tokenizer: PreTrainedTokenizerBase, other: PreTrainedTokenizerBase, other_name: str) -> None:
    """Refuses a tokenizer that maps any token to a different id than ``tokenizer`` does.

    Raises:
        ValueError: naming the first token whose id differs and both ids.
    """
    ours: dict[str, int] = tokenizer.get_vocab()
    theirs: dict[str, Any] = other.get_vocab()
    if ours == theirs:
        return
    for token in sorted(set(ours) | set(theirs), key=lambda t: (ours.get(t, theirs.get(t, -1)), t)):
        if ours.get(token) != theirs.get(token):
            raise ValueError(f'the {other_name} tokenizer maps token {token!r} to id {theirs.get(token)} but the run '
                             f'tokenizer maps it to {ours.get(token)}: distillation needs one shared vocabulary')

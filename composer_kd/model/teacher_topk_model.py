"""A frozen teacher as a Composer model whose forward returns its top-k next tokens, for ``Trainer.predict``.

Shapes: B batch, T sequence length, V vocabulary (``len(tokenizer)``; padded embedding rows are cut), K entries
kept, M recorded temperatures, C rows of one chunk.

The teacher's logits ``(B, T, V)`` are reduced chunk by chunk of rows: each chunk is upcast to float32,
log-softmaxed, its top-K taken and its rest mass computed for every temperature, so no float32
``(B·T, V)`` copy exists and the teacher's forward dominates the cost.
"""

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from composer.models import ComposerModel
from transformers import PreTrainedModel

from composer_kd.losses.chunked import default_chunk_elements
from composer_kd.model.frozen_teachers import FrozenTeachers

__all__ = ['TeacherTopKModel', 'topk_logprobs']


def topk_logprobs(logits: torch.Tensor,
                  k: int,
                  temperatures: Sequence[float],
                  vocab_size: int | None = None,
                  chunk_elements: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-K of ``log_softmax(logits)`` and the log rest mass at each temperature.

    Args:
        logits (Tensor): ``(N, V')`` in any float dtype; columns past ``vocab_size`` are ignored.
        k (int): entries kept per row.
        temperatures (Sequence[float]): M temperatures; the rest mass at T is that of ``softmax(logits / T)``
            outside the K ids (the ids are the top-K at T = 1, which are the top-K at every T).
        vocab_size (int, optional): V, the columns that are real tokens. Default: all of them.
        chunk_elements (int, optional): rows × V upcast at a time. Default: as the loss.

    Returns:
        ids ``(N, K)`` int64 (most likely first), log-probs ``(N, K)`` float32 at T = 1, rest ``(N, M)`` float32
        (−inf when K = V).
    """
    n, vocab = logits.shape[0], vocab_size or logits.shape[1]
    chunk = max(1, (chunk_elements or default_chunk_elements(logits.device)) // vocab)
    ids = torch.empty(n, k, dtype=torch.long, device=logits.device)
    values = torch.empty(n, k, dtype=torch.float32, device=logits.device)
    rest = torch.empty(n, len(temperatures), dtype=torch.float32, device=logits.device)
    for start in range(0, n, chunk):
        rows = slice(start, start + chunk)
        log_p = F.log_softmax(logits[rows, :vocab].float(), dim=-1)
        values[rows], ids[rows] = log_p.topk(k, dim=-1)
        for m, temperature in enumerate(temperatures):
            tempered = log_p if temperature == 1.0 else F.log_softmax(log_p / temperature, dim=-1)
            rest[rows, m] = _log_rest(tempered, ids[rows])
    return ids, values, rest


def _log_rest(log_p: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log Σ of ``exp(log_p)`` outside ``ids`` per row: all minus the top entries, summed in float64, so the
    difference is exact to ~1e-16 (a rest below that is stored as 0 mass, −inf)."""
    p = log_p.exp()
    rest = p.sum(dim=-1, dtype=torch.float64) - p.gather(1, ids).sum(dim=-1, dtype=torch.float64)
    return rest.clamp(min=0.0).log().float()


class TeacherTopKModel(ComposerModel):
    """``forward(batch)`` → ``{'ids', 'logprobs', 'rest'}`` of the teacher at every position of the batch.

    The teacher is frozen (no gradients, eval mode) and prepared for FSDP like ``DistillationModel``'s, so the
    same ``fsdp_config`` shards it. An ensemble (``FrozenTeachers`` of several models) is reduced to one set of
    logits at temperature 1 first (``ensemble_teacher_logits``), and its top-k is stored.

    Args:
        teacher (PreTrainedModel | FrozenTeachers): the causal LM, or an ensemble.
        vocab_size (int): the shared vocabulary, ``len(tokenizer)``; logits past it are cut.
        k (int): top entries kept.
        temperatures (Sequence[float]): temperatures whose rest mass is recorded.
    """

    def __init__(self, teacher: PreTrainedModel | FrozenTeachers, vocab_size: int, k: int,
                 temperatures: Sequence[float]) -> None:
        super().__init__()
        self.teachers = teacher if isinstance(teacher, FrozenTeachers) else FrozenTeachers([teacher])
        self.vocab_size, self.k, self.temperatures = vocab_size, k, tuple(temperatures)

    def forward(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            inputs = {'input_ids': batch['input_ids'], 'attention_mask': batch.get('attention_mask'),
                      'use_cache': False}
            logits = self.teachers(inputs, self.vocab_size, 1.0)
            B, T, rows = logits.shape
            ids, values, rest = topk_logprobs(logits.reshape(B * T, rows), self.k, self.temperatures, self.vocab_size)
        return {'ids': ids.view(B, T, -1), 'logprobs': values.view(B, T, -1), 'rest': rest.view(B, T, -1)}

    def loss(self, outputs: Any, batch: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise NotImplementedError('TeacherTopKModel only predicts; it is never trained')

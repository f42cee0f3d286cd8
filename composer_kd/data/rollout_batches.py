"""Training batches from prompts and their continuations (sampled by the student or the teacher, or the dataset's
responses): each row is its prompt's tokens followed by its continuation, right-padded, and only the
continuation is scored.

Shapes: B batch, P prompt width (prompts left-padded), N continuation width, L the batch's longest row.

A continuation is scored up to and including its first end-of-sequence token — the student must learn to stop —
even when the pad token is the EOS token: labels come from positions, never from comparing ids with the pad
id. Anything after the first EOS is not scored; a continuation that never ends is scored whole (truncated at
the generation budget). Rows are right-aligned (the prompt starts at position 0), so the training forward's
positions are the ones ``generate`` used for the prompt's tokens and their continuation.
"""

from typing import Mapping, Optional, Sequence

import torch

__all__ = ['assemble_rollout_batch', 'continuation_lengths', 'supervised_batch']


def continuation_lengths(tokens: torch.Tensor, eos_ids: Sequence[int],
                         available: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each continuation's scored length and whether it ended.

    Args:
        tokens (Tensor): ``(B, N)`` continuations.
        eos_ids (Sequence[int]): the ids that end a sequence.
        available (Tensor, optional): ``(B,)`` how many leading tokens of each row are real (dataset responses);
            default: all N.

    Returns:
        ``(lengths (B,), ended (B,) bool)``: up to and including the first EOS; else every available token.
    """
    B, N = tokens.shape
    available = torch.full((B,), N, dtype=torch.long, device=tokens.device) if available is None else available
    position = torch.arange(N, device=tokens.device)[None, :]
    is_eos = torch.isin(tokens, torch.tensor(list(eos_ids), device=tokens.device)) & (position < available[:, None])
    ended = is_eos.any(dim=1)
    first = torch.where(ended, is_eos.float().argmax(dim=1), available - 1)  # argmax: the first True
    return torch.where(ended | (available > 0), first + 1, torch.zeros_like(first)), ended


def assemble_rollout_batch(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, continuations: torch.Tensor,
                           lengths: torch.Tensor, pad_token_id: int,
                           aligned: Optional[Mapping[str, torch.Tensor]] = None) -> dict[str, torch.Tensor]:
    """``input_ids``, ``attention_mask`` and ``labels`` ``(B, L)``: each row's prompt then its first ``lengths``
    continuation tokens; labels are ``-100`` on the prompt and padding, the token itself on the continuation.

    Args:
        prompt_ids (Tensor): ``(B, P)`` left-padded prompts. prompt_mask (Tensor): ``(B, P)``, 1 on real tokens.
        continuations (Tensor): ``(B, N)``. lengths (Tensor): ``(B,)`` tokens of each continuation to keep.
        pad_token_id (int): fills the padding.
        aligned (Mapping, optional): per-token values ``(B, N)`` of the continuations (the sampler's log-probs):
            returned at their tokens' positions ``(B, L)``, 0 elsewhere.
    """
    B = prompt_ids.shape[0]
    prompt_lengths = prompt_mask.sum(dim=1)
    total = prompt_lengths + lengths
    L = max(int(total.max()), 1)
    device = prompt_ids.device
    input_ids = torch.full((B, L), pad_token_id, dtype=torch.long, device=device)
    attention_mask = torch.zeros((B, L), dtype=torch.long, device=device)
    labels = torch.full((B, L), -100, dtype=torch.long, device=device)
    placed = {name: torch.zeros((B, L), dtype=value.dtype, device=device) for name, value in (aligned or {}).items()}
    for row in range(B):
        p, n = int(prompt_lengths[row]), int(lengths[row])
        prompt = prompt_ids[row, prompt_ids.shape[1] - p:]
        input_ids[row, :p] = prompt
        input_ids[row, p:p + n] = continuations[row, :n]
        attention_mask[row, :p + n] = 1
        labels[row, p:p + n] = continuations[row, :n]
        for name, value in (aligned or {}).items():
            placed[name][row, p:p + n] = value[row, :n]
    return {'input_ids': input_ids, 'attention_mask': attention_mask, 'labels': labels, **placed}


def supervised_batch(batch: Mapping[str, torch.Tensor], eos_ids: Sequence[int],
                     pad_token_id: int) -> dict[str, torch.Tensor]:
    """A batch of prompts (``data/prompts.py``) as prompt + dataset response, only the response scored."""
    lengths, _ = continuation_lengths(batch['response_ids'], eos_ids, batch['response_mask'].sum(dim=1))
    out = assemble_rollout_batch(batch['prompt_ids'], batch['prompt_mask'], batch['response_ids'], lengths,
                                 pad_token_id)
    return {**out, 'sample_id': batch['sample_id']}

"""Sampling continuations that depend only on (run seed, step, sample id): the Gumbel-max trick with noise from a
counter-based hash, as a ``transformers`` logits processor.

Shapes: B rows being generated, V vocabulary.

``torch.multinomial`` draws each row from one shared generator, so what a row samples depends on the rows before
it: on 2 processes (half the batch each), or after a resume, the same prompt would get another continuation.
Here each row's noise at generated position t and token v is a pure function of ``(key of the row, t, v)`` —
``splitmix64`` mixing on int64 tensors, vectorised over the vocabulary — and the token taken is
``argmax(log p + G)`` with G ~ Gumbel(0, 1): an exact sample from ``p`` (temperature, top-k and top-p applied
first). ``generate`` then decodes greedily over the processed scores. No random-number state exists, so a
resumed run samples exactly what the uninterrupted run sampled, and 1 and N processes sample the same.
"""

import math

import torch
from transformers import LogitsProcessor

__all__ = ['SeededGumbelSampler', 'row_keys', 'uniform_noise']

_MASK64 = (1 << 64) - 1


def _signed(value: int) -> int:
    """A 64-bit pattern as torch's int64."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN, _MUL1, _MUL2 = _signed(0x9E3779B97F4A7C15), _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB)


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's ``>>`` is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 tensors (wrapping arithmetic)."""
    z = x + _GOLDEN
    z = (z ^ _shift_right(z, 30)) * _MUL1
    z = (z ^ _shift_right(z, 27)) * _MUL2
    return z ^ _shift_right(z, 31)


def row_keys(seed: int, step: int, sample_ids: torch.Tensor, stream: int = 0) -> torch.Tensor:
    """``(B,)`` int64 keys of the rows: one per (seed, step, sample id, stream) — ``stream`` tells apart the student's
    samples (0) from the teacher's (1)."""
    key = _mix(torch.tensor(_signed(seed), dtype=torch.long, device=sample_ids.device))
    key = _mix(key ^ _signed(step))
    key = _mix(key ^ _signed(stream))
    return _mix(key ^ sample_ids.long())


def uniform_noise(keys: torch.Tensor, position: int, vocab: int) -> torch.Tensor:
    """``(B, V)`` float64 uniforms in (0, 1), a function of each row's key, the position and the token id only."""
    base = _mix(keys ^ _signed(position * 0x632BE59BD9B4E019))[:, None]
    bits = _shift_right(_mix(base + torch.arange(vocab, device=keys.device, dtype=torch.long)[None, :]), 11)
    return (bits.double() + 0.5) / float(1 << 53)


class SeededGumbelSampler(LogitsProcessor):
    """Samples each next token from ``softmax(logits / temperature)`` (optionally top-k / top-p filtered) with
    noise keyed by the rows (see the module); use with greedy decoding (``do_sample=False``).

    Args:
        keys (Tensor): ``(B,)`` the rows' keys (``row_keys``).
        prompt_width (int): the prompts' padded width (the first generated position).
        temperature (float): > 0. top_k (int): 0 keeps every token. top_p (float): in (0, 1]; 1 keeps every token.

    Attributes:
        logprobs (list[Tensor]): per generated position, ``(B,)`` the log-probability of the token taken under the
            distribution it was sampled from.
    """

    def __init__(self, keys: torch.Tensor, prompt_width: int, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0) -> None:
        self.keys, self.prompt_width = keys, prompt_width
        self.temperature, self.top_k, self.top_p = float(temperature), int(top_k), float(top_p)
        self.logprobs: list[torch.Tensor] = []

    def _filter(self, logp: torch.Tensor) -> torch.Tensor:
        if self.top_k > 0 and self.top_k < logp.shape[-1]:
            kth = logp.topk(self.top_k, dim=-1).values[:, -1:]
            logp = logp.masked_fill(logp < kth, -math.inf)
        if self.top_p < 1.0:
            sorted_logp, order = logp.sort(dim=-1, descending=True)
            before = sorted_logp.exp().cumsum(dim=-1) - sorted_logp.exp()  # mass of the tokens ranked above
            drop = torch.zeros_like(logp, dtype=torch.bool).scatter_(1, order, before >= self.top_p)
            logp = logp.masked_fill(drop, -math.inf)
        return torch.log_softmax(logp, dim=-1)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        logp = self._filter(torch.log_softmax(scores.float() / self.temperature, dim=-1))  # (B, V)
        position = input_ids.shape[1] - self.prompt_width
        u = uniform_noise(self.keys, position, logp.shape[-1])
        noisy = logp + (-torch.log(-torch.log(u))).to(logp.dtype)  # + Gumbel(0, 1)
        chosen = noisy.argmax(dim=-1)
        self.logprobs.append(logp.gather(1, chosen[:, None]).squeeze(1))
        return noisy

    def taken_logprobs(self, width: int) -> torch.Tensor:
        """``(B, width)`` the log-probabilities of the tokens taken so far (0 past the last step)."""
        out = torch.zeros((self.keys.shape[0], width), device=self.keys.device)
        for t, values in enumerate(self.logprobs[:width]):
            out[:, t] = values
        return out

"""What a ``prepare-data`` worker process runs: load the tokenizer once, then tokenize batches of texts.

Kept apart from ``prepare.py`` so that a spawned worker imports only NumPy and transformers (not Streaming or
torch). Workers are spawned, not forked: forking a process that already runs threads (torch, Streaming,
tokenizers) can leave a lock held in the child, which then hangs — seen once under pytest.
"""

from typing import Optional

import numpy as np
from transformers import AutoTokenizer, PreTrainedTokenizerBase

__all__ = ['init_worker', 'tokenize']

_worker_tokenizer: Optional[PreTrainedTokenizerBase] = None


def init_worker(name: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = AutoTokenizer.from_pretrained(name)


def tokenize(texts: list[str], tokenizer: Optional[PreTrainedTokenizerBase] = None) -> list[np.ndarray]:
    """Token ids of each text as int32 arrays (from a worker they travel as bytes, not as lists of ints)."""
    tok = tokenizer or _worker_tokenizer
    assert tok is not None
    return [np.asarray(ids, dtype=np.int32) for ids in tok(texts, add_special_tokens=False)['input_ids']]

"""What a ``prepare-data`` worker process runs: build the tokenizer once, then tokenize batches of texts.

Workers are spawned, not forked: forking a process that already runs threads (torch, Streaming, tokenizers) can
leave a lock held in the child, which then hangs — seen once under pytest. A spawned worker pays for its imports,
so this module (and the lazy ``composer_kd`` and ``composer_kd.data`` packages above it) imports only NumPy and
``tokenizers``: a fast tokenizer travels to the workers as its ``tokenizer.json`` text and runs on the Rust
backend, which is what ``PreTrainedTokenizerFast.__call__`` runs too (same ids). Only a slow (Python) tokenizer
makes a worker import transformers and load it by name.
"""

from typing import Any, Optional

import numpy as np

__all__ = ['TokenizerSpec', 'tokenizer_spec', 'build_tokenizer', 'init_worker', 'tokenize']

TokenizerSpec = tuple[str, str]  # ('json', tokenizer.json text) or ('name', folder or Hub id)

_worker_tokenizer: Any = None


def tokenizer_spec(tokenizer: Any, name: str) -> TokenizerSpec:
    """How a worker rebuilds ``tokenizer`` (a transformers tokenizer loaded from ``name``)."""
    backend = getattr(tokenizer, 'backend_tokenizer', None)  # set on fast tokenizers only
    return ('json', backend.to_str()) if backend is not None else ('name', name)


def build_tokenizer(spec: TokenizerSpec) -> Any:
    """A ``tokenizers.Tokenizer`` (fast) or a transformers tokenizer (slow) from :func:`tokenizer_spec`'s output."""
    kind, value = spec
    if kind == 'json':
        from tokenizers import Tokenizer
        return Tokenizer.from_str(value)
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(value)


def init_worker(spec: TokenizerSpec) -> None:
    global _worker_tokenizer
    _worker_tokenizer = build_tokenizer(spec)


def tokenize(texts: list[str], tokenizer: Optional[Any] = None) -> list[np.ndarray]:
    """Token ids of each text, without special tokens, as int32 arrays (from a worker they travel as bytes).

    Args:
        texts (list[str]): the texts.
        tokenizer (optional): what :func:`build_tokenizer` returns; default: this worker's.
    """
    tok = tokenizer if tokenizer is not None else _worker_tokenizer
    assert tok is not None, 'init_worker was not called'
    if hasattr(tok, 'encode_batch'):  # tokenizers.Tokenizer
        # One text at a time: an Encoding holds ~500 bytes a token (strings, offsets, masks), so a whole batch's
        # would cost hundreds of MB; the ids alone are kept. (Threads are off: TOKENIZERS_PARALLELISM=false.)
        return [np.asarray(tok.encode(text, add_special_tokens=False).ids, dtype=np.int32) for text in texts]
    return [np.asarray(ids, dtype=np.int32) for ids in tok(texts, add_special_tokens=False)['input_ids']]

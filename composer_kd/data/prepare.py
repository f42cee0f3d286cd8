"""``composer-kd prepare-data``: text, ``.jsonl`` and ``.jsonl.gz`` files → tokenized, concatenated ``tokens`` MDS
shards (zstd), in LLM Foundry's ``concat_tokens`` layout (``data/packing.py``), readable by Foundry's loaders.

Files stream through in bounded pieces (``data/documents.py``); worker processes tokenize batches of pieces
while the main process packs and writes, and the results are taken in input order, so the output is the same
for any number of workers. The split of a document is decided by a hash of its name, so it is stable when
files are added or removed. With ``remote``, Streaming uploads each shard as it is written.
"""

import collections
import multiprocessing
import os
from typing import Any, Iterator, Optional, Sequence

import numpy as np
from streaming import MDSWriter
from tqdm import tqdm
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from composer_kd.data.documents import DEFAULT_EXTENSIONS, find_documents, read_pieces, split_of
from composer_kd.data.packing import COLUMNS, Packer
from composer_kd.data.staging import staged_folder
from composer_kd.data.tokenize_worker import build_tokenizer, init_worker, tokenize, tokenizer_spec
from composer_kd.errors import ConfigError

__all__ = ['prepare_data', 'find_documents', 'split_of', 'COLUMNS']

_BATCH_CHARS = 2**20  # text per task sent to a worker
_IN_FLIGHT = 4  # tasks per worker queued ahead: bounds memory, keeps the workers busy

Piece = tuple[str, str, bool, bool]  # (document, text, first piece, last piece)


def _load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise ConfigError(f'--tokenizer: cannot load a tokenizer from {name!r}: {str(e).splitlines()[0]}') from e


def _batches(documents: Sequence[tuple[str, str]], text_key: str, progress: tqdm) -> Iterator[list[Piece]]:
    """Pieces of every document in order, grouped into batches of about ``_BATCH_CHARS`` characters."""
    batch: list[Piece] = []
    size = 0
    for name, path in documents:
        first = True
        for doc, text, last in read_pieces(name, path, text_key):
            batch.append((doc, text, first, last))
            size += len(text)
            first = last  # the next piece starts a new document after a last piece
            if size >= _BATCH_CHARS:
                yield batch
                batch, size = [], 0
        progress.update(1)
    if batch:
        yield batch


def _in_order(pool: Any, batches: Iterator[list[Piece]], window: int) -> Iterator[tuple[list[Piece], list[np.ndarray]]]:
    """``(batch, token ids)`` in input order, at most ``window`` batches in flight (``Pool.imap`` would read the
    whole input ahead into memory)."""
    pending: collections.deque = collections.deque()
    for batch in batches:
        pending.append((batch, pool.apply_async(tokenize, ([text for _, text, _, _ in batch],))))
        if len(pending) >= window:
            done, result = pending.popleft()
            yield done, result.get()
    while pending:
        done, result = pending.popleft()
        yield done, result.get()


def _special_ids(tok: PreTrainedTokenizerBase, text: Optional[str], default: list[int]) -> list[int]:
    return default if text is None else tok(text, add_special_tokens=False)['input_ids']


def prepare_data(inputs: Sequence[str],
                 tokenizer: str,
                 out: str,
                 max_seq_len: int,
                 val_fraction: float = 0.05,
                 extensions: Sequence[str] = DEFAULT_EXTENSIONS,
                 text_key: str = 'text',
                 overwrite: bool = False,
                 workers: Optional[int] = None,
                 bos_text: Optional[str] = None,
                 eos_text: Optional[str] = None,
                 no_wrap: bool = False,
                 remote: Optional[str] = None,
                 progress_bar: bool = True) -> dict[str, dict[str, int]]:
    """Writes ``out/train`` and ``out/val`` MDS datasets (and uploads them to ``remote/train``, ``remote/val``);
    returns ``{split: {'samples', 'tokens', 'documents'}}``.

    Args:
        workers (int, optional): tokenizing processes (default: every core; 1 tokenizes in this process). They
            are spawned, so a script that calls this with more than one worker needs the usual
            ``if __name__ == '__main__':`` guard (a notebook or the CLI does not).
        bos_text (str, optional): text put before each document (default: nothing).
        eos_text (str, optional): text put after each document (default: the tokenizer's EOS token).
        no_wrap (bool): drop what is left of a document after a sample is cut, instead of continuing it.

    Raises:
        ConfigError: for missing inputs, an unusable tokenizer, ``max_seq_len < 2``, ``val_fraction`` outside
            [0, 1), ``workers < 1``, or an existing non-empty ``out`` without ``overwrite``.
    """
    if max_seq_len < 2:
        raise ConfigError(f'--max-seq-len must be at least 2, got {max_seq_len}')
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f'--val-fraction must be in [0, 1), got {val_fraction}')
    workers = (os.cpu_count() or 1) if workers is None else workers
    if workers < 1:
        raise ConfigError(f'--workers must be at least 1, got {workers}')
    documents = find_documents(inputs, extensions)
    # One thread per process: the parallelism is the workers' (and the output the same for any count).
    os.environ['TOKENIZERS_PARALLELISM'] = 'false'
    tok = _load_tokenizer(tokenizer)
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise ConfigError(f'--out: {out} exists and is not empty (pass --overwrite to replace it)')
    spec = tokenizer_spec(tok, tokenizer)
    bos = _special_ids(tok, bos_text, [])
    eos = _special_ids(tok, eos_text, [tok.eos_token_id] if tok.eos_token_id is not None else [])
    with staged_folder(out) as staging:
        packers = {
            split: Packer(MDSWriter(columns=COLUMNS, out=_destination(staging, remote, split), compression='zstd',
                                    keep_local=True), max_seq_len, bos, eos, wrap=not no_wrap)
            for split in ('train', 'val')
        }
        counts = {'train': 0, 'val': 0}
        progress = tqdm(total=len(documents), desc='prepare-data', unit='file', disable=not progress_bar)
        batches = _batches(documents, text_key, progress)
        if workers == 1:
            local = build_tokenizer(spec)  # what a worker would run, so 1 and N workers write the same ids
            results: Iterator = ((batch, tokenize([t for _, t, _, _ in batch], local)) for batch in batches)
            _pack(results, packers, counts, val_fraction)
        else:
            with multiprocessing.get_context('spawn').Pool(workers, init_worker, (spec,)) as pool:
                _pack(_in_order(pool, batches, workers * _IN_FLIGHT), packers, counts, val_fraction)
        progress.close()
        summary = {}
        for split, packer in packers.items():
            packer.close()
            summary[split] = {'samples': packer.samples, 'tokens': packer.tokens, 'documents': counts[split]}
        return summary


def _destination(staging: str, remote: Optional[str], split: str) -> Any:
    local = os.path.join(staging, split)
    return local if remote is None else (local, f'{remote.rstrip("/")}/{split}')


def _pack(results: Iterator[tuple[list[Piece], list[np.ndarray]]], packers: dict[str, Packer], counts: dict[str, int],
          val_fraction: float) -> None:
    for batch, ids in results:
        for (doc, text, first, last), piece_ids in zip(batch, ids):
            if first and last and not text:
                continue  # an empty document
            split = split_of(doc, val_fraction)
            counts[split] += first
            packers[split].add(piece_ids, doc, first, last)

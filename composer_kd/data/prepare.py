"""``composer-kd prepare-data``: text and ``.jsonl`` files → tokenized, concatenated ``tokens`` MDS shards.

Each document is tokenized, followed by EOS, and appended to one stream per split that is cut into samples
of ``max_seq_len`` tokens (LLM Foundry's ``concat_tokens`` layout; the last partial sample is kept). The
split of a document is decided by a hash of its name, so it is stable when files are added or removed.
"""

import hashlib
import json
import os
from typing import Iterator, Sequence

import numpy as np
from streaming import MDSWriter
from tqdm import tqdm
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from composer_kd.data.staging import staged_folder
from composer_kd.errors import ConfigError

__all__ = ['prepare_data', 'find_documents', 'split_of']

_BATCH_DOCS = 256
# Foundry's concat_tokens column, plus the document each sample starts in (per-sample tracking names it).
COLUMNS = {'tokens': 'ndarray:int32', 'source': 'str'}


def split_of(name: str, val_fraction: float) -> str:
    """``'val'`` for about ``val_fraction`` of names, chosen by a hash of the name; else ``'train'``."""
    bucket = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], 'big') / 2**64
    return 'val' if bucket < val_fraction else 'train'


def find_documents(inputs: Sequence[str], extensions: Sequence[str]) -> list[tuple[str, str]]:
    """Sorted ``(name, path)`` of every input file; folders are searched recursively for ``extensions``.

    ``name`` is the path relative to its input folder (the file name for a file input).
    """
    found = []
    for item in inputs:
        if os.path.isfile(item):
            found.append((os.path.basename(item), item))
        elif os.path.isdir(item):
            for root, dirs, files in os.walk(item):
                dirs.sort()
                for f in sorted(files):
                    if f.endswith(tuple(extensions)):
                        path = os.path.join(root, f)
                        found.append((os.path.relpath(path, item), path))
        else:
            raise ConfigError(f'--input: no such file or folder: {item}')
    if not found:
        raise ConfigError(f'--input: no files ending in {list(extensions)} under {list(inputs)}')
    return sorted(set(found))


def _texts(name: str, path: str, text_key: str) -> Iterator[tuple[str, str]]:
    """``(document name, text)`` pairs of one file: one per line of a ``.jsonl``, else the whole file."""
    with open(path, encoding='utf-8', errors='replace') as f:
        if not path.endswith('.jsonl'):
            yield name, f.read()
            return
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f'{path}:{line_no}: not valid JSON ({e.msg})') from e
            if not isinstance(record, dict) or not isinstance(record.get(text_key), str):
                raise ConfigError(f'{path}:{line_no}: expected an object with a string field {text_key!r}')
            yield f'{name}:{line_no}', record[text_key]


class _Packer:
    """Concatenates token ids and writes full ``max_seq_len`` samples to an MDS writer, each with the name of the
    document its first token comes from (``source``)."""

    def __init__(self, writer: MDSWriter, max_seq_len: int) -> None:
        self.writer, self.max_seq_len = writer, max_seq_len
        self.buffer: list[int] = []
        self.starts: list[tuple[int, str]] = []  # (offset in buffer, document) of each document in the buffer
        self.samples = 0
        self.tokens = 0

    def add(self, ids: list[int], source: str) -> None:
        self.starts.append((len(self.buffer), source))
        self.buffer.extend(ids)
        while len(self.buffer) >= self.max_seq_len:
            self._write(self.buffer[:self.max_seq_len])
            del self.buffer[:self.max_seq_len]
            shifted = [(offset - self.max_seq_len, name) for offset, name in self.starts]
            covering = max(i for i, (offset, _) in enumerate(shifted) if offset <= 0)
            self.starts = shifted[covering:]

    def _write(self, ids: list[int]) -> None:
        source = max((item for item in self.starts if item[0] <= 0), key=lambda item: item[0])[1]
        self.writer.write({'tokens': np.asarray(ids, dtype=np.int32), 'source': source})
        self.samples += 1
        self.tokens += len(ids)

    def close(self) -> None:
        if len(self.buffer) >= 2:  # a sample needs one target at least
            self._write(self.buffer)
        self.writer.finish()


def _load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise ConfigError(f'--tokenizer: cannot load a tokenizer from {name!r}: {str(e).splitlines()[0]}') from e


def prepare_data(inputs: Sequence[str],
                 tokenizer: str,
                 out: str,
                 max_seq_len: int,
                 val_fraction: float = 0.05,
                 extensions: Sequence[str] = ('.txt', '.jsonl'),
                 text_key: str = 'text',
                 overwrite: bool = False) -> dict[str, dict[str, int]]:
    """Writes ``out/train`` and ``out/val`` MDS datasets; returns ``{split: {'samples', 'tokens', 'documents'}}``.

    Raises:
        ConfigError: for missing inputs, an unusable tokenizer, ``max_seq_len < 2``, ``val_fraction`` outside
            [0, 1), or an existing non-empty ``out`` without ``overwrite``.
    """
    if max_seq_len < 2:
        raise ConfigError(f'--max-seq-len must be at least 2, got {max_seq_len}')
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f'--val-fraction must be in [0, 1), got {val_fraction}')
    documents = find_documents(inputs, extensions)
    tok = _load_tokenizer(tokenizer)
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise ConfigError(f'--out: {out} exists and is not empty (pass --overwrite to replace it)')
    with staged_folder(out) as staging:
        return _write_splits(documents, tok, staging, max_seq_len, val_fraction, text_key)


def _write_splits(documents: Sequence[tuple[str, str]], tok: PreTrainedTokenizerBase, out: str, max_seq_len: int,
                  val_fraction: float, text_key: str) -> dict[str, dict[str, int]]:
    """Tokenizes ``documents`` into ``out/train`` and ``out/val``; returns the per-split counts."""
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    packers = {
        split: _Packer(MDSWriter(columns=COLUMNS, out=os.path.join(out, split), compression='zstd'), max_seq_len)
        for split in ('train', 'val')
    }
    counts = {'train': 0, 'val': 0}
    pending: dict[str, list[tuple[str, str]]] = {'train': [], 'val': []}  # (document, text)

    def flush(split: str) -> None:
        if not pending[split]:
            return
        names, texts = zip(*pending[split])
        for name, ids in zip(names, tok(list(texts), add_special_tokens=False)['input_ids']):
            packers[split].add(ids + eos, name)
        pending[split].clear()

    for name, path in tqdm(documents, desc='prepare-data', unit='file'):
        for doc_name, text in _texts(name, path, text_key):
            if not text:
                continue
            split = split_of(doc_name, val_fraction)
            pending[split].append((doc_name, text))
            counts[split] += 1
            if len(pending[split]) >= _BATCH_DOCS:
                flush(split)
    summary = {}
    for split, packer in packers.items():
        flush(split)
        packer.close()
        summary[split] = {'samples': packer.samples, 'tokens': packer.tokens, 'documents': counts[split]}
    return summary

"""The documents ``prepare-data`` reads: which files, which split each document goes to, and their text in pieces
of bounded size (a file of any size is read without holding it whole).

``.jsonl`` and ``.jsonl.gz`` hold one document per line (its ``text_key`` field); any other file is one document,
read in pieces of at most ``PIECE_CHARS`` characters cut at line ends. Each piece is tokenized on its own, so a
huge file costs the memory of one piece; the tokens right at a cut may differ from tokenizing the file whole
(a run of whitespace across the line end is split), which only files over ``PIECE_CHARS`` see.
"""

import gzip
import hashlib
import json
import os
from typing import IO, Iterator, Sequence

from composer_kd.errors import ConfigError

__all__ = ['PIECE_CHARS', 'DEFAULT_EXTENSIONS', 'split_of', 'find_documents', 'read_pieces']

PIECE_CHARS = 2**20  # a tokenizers Encoding costs ~500 bytes a token: ~150 MB for a piece of this size
DEFAULT_EXTENSIONS = ('.txt', '.jsonl', '.jsonl.gz')


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


def _open(path: str) -> IO[str]:
    if path.endswith('.gz'):
        return gzip.open(path, 'rt', encoding='utf-8', errors='replace')
    return open(path, encoding='utf-8', errors='replace')


def _is_jsonl(path: str) -> bool:
    return path.endswith(('.jsonl', '.jsonl.gz'))


def read_pieces(name: str, path: str, text_key: str) -> Iterator[tuple[str, str, bool]]:
    """``(document name, text, last piece of the document)`` of one file, in order.

    Raises:
        DataError-like ``ConfigError``: a ``.jsonl`` line that is not an object with a string ``text_key``.
    """
    with _open(path) as f:
        if _is_jsonl(path):
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ConfigError(f'{path}:{line_no}: not valid JSON ({e.msg})') from e
                if not isinstance(record, dict) or not isinstance(record.get(text_key), str):
                    raise ConfigError(f'{path}:{line_no}: expected an object with a string field {text_key!r}')
                yield f'{name}:{line_no}', record[text_key], True
            return
        pieces = _line_pieces(f)
        piece = next(pieces)
        for following in pieces:  # one piece ahead, to know which is the last
            yield name, piece, False
            piece = following
        yield name, piece, True


def _line_pieces(f: IO[str]) -> Iterator[str]:
    """The text of ``f`` as the longest runs of whole lines of at most ``PIECE_CHARS`` characters (a longer line is
    a piece of its own); at least one piece, ``''`` for an empty file. Reads blocks, not lines: lines cost the
    main process a Python step each, and it is the bottleneck when workers tokenize."""
    carry, started = '', False
    while True:
        block = carry + f.read(PIECE_CHARS + 1 - len(carry))  # one character more than a piece: is there more?
        if len(block) <= PIECE_CHARS:  # the rest of the file
            if block or not started:
                yield block
            return
        cut = block.rfind('\n', 0, PIECE_CHARS) + 1  # the last line that ends within a piece's length
        if cut == 0:  # the first line is longer than a piece: all of it
            cut = block.find('\n') + 1
            if cut == 0:
                block += f.readline()
                cut = len(block)
        yield block[:cut]
        carry, started = block[cut:], True

"""Concatenating tokenized documents into fixed-length samples: LLM Foundry's ``concat_tokens`` layout.

Each document becomes ``bos + ids + eos`` and is appended to one stream per split, cut into samples of
``max_seq_len`` tokens. With ``wrap`` (the default) the rest of a document continues the next sample; without
it (Foundry's ``--no_wrap``) whatever is left after a sample is cut is dropped. The last partial sample is kept.
"""

import numpy as np
from streaming import MDSWriter

__all__ = ['COLUMNS', 'Packer']

# Foundry's concat_tokens column, plus the document each sample starts in (per-sample tracking names it).
COLUMNS = {'tokens': 'ndarray:int32', 'source': 'str'}


class Packer:
    """Writes full ``max_seq_len`` samples to an MDS writer, each with the name of the document its first token
    comes from (``source``).

    Args:
        writer (MDSWriter): the split's writer (``COLUMNS``).
        max_seq_len (int): tokens per sample.
        bos (list[int]): ids put before each document. eos (list[int]): ids put after each document.
        wrap (bool): continue a document into the next sample (else drop the rest).
    """

    def __init__(self, writer: MDSWriter, max_seq_len: int, bos: list[int], eos: list[int], wrap: bool = True) -> None:
        self.writer, self.max_seq_len, self.wrap = writer, max_seq_len, wrap
        self.bos, self.eos = np.asarray(bos, dtype=np.int32), np.asarray(eos, dtype=np.int32)
        self.buffer = np.zeros(0, dtype=np.int32)
        self.starts: list[tuple[int, str]] = []  # (offset in buffer, document) of each document in the buffer
        self.samples = 0
        self.tokens = 0
        self._skip = False

    def add(self, ids: np.ndarray, source: str, first: bool = True, last: bool = True) -> None:
        """Appends one piece of a document (int32 ids; ``first``/``last``: it starts/ends the document)."""
        if first:
            self._skip = False
            self.starts.append((len(self.buffer), source))
        elif self._skip:  # no wrap: the rest of a document that was cut is dropped
            return
        parts = [self.buffer, self.bos if first else None, np.asarray(ids, dtype=np.int32), self.eos if last else None]
        self.buffer = np.concatenate([p for p in parts if p is not None])
        cut = 0  # samples are cut from the front; the buffer is shortened once, after the loop
        while len(self.buffer) - cut >= self.max_seq_len:
            self._write(self.buffer[cut:cut + self.max_seq_len], cut)
            cut += self.max_seq_len
            if not self.wrap:
                self.buffer, self.starts, self._skip, cut = self.buffer[:0], [], not last, 0
                break
        if cut:
            self.buffer = self.buffer[cut:].copy()
            shifted = [(offset - cut, name) for offset, name in self.starts]
            covering = max(i for i, (offset, _) in enumerate(shifted) if offset <= 0)
            self.starts = shifted[covering:]

    def _write(self, ids: np.ndarray, at: int = 0) -> None:
        """Writes a sample that starts at buffer offset ``at``, named after the last document starting by then."""
        source = max((item for item in self.starts if item[0] <= at), key=lambda item: item[0])[1]
        self.writer.write({'tokens': ids, 'source': source})
        self.samples += 1
        self.tokens += len(ids)

    def close(self) -> None:
        if len(self.buffer) >= 2:  # a sample needs one target at least
            self._write(self.buffer)
        self.writer.finish()

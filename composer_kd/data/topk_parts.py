"""The on-disk layout of a ``precompute-teacher`` output split, written in parts so that it can be resumed.

::

    OUT/SPLIT/precompute_plan.json      the settings and part size, written first (a rerun must match it)
    OUT/SPLIT/part-00000/               samples [0, P): an MDS dataset, written all at once (staged, renamed)
              part-00000/part.json      its record: first sample, samples, tokens (written last, inside)
    OUT/SPLIT/part-00001/ ...
    OUT/SPLIT/index.json                the merge of the parts' indexes, in part order (Streaming's layout)
    OUT/SPLIT/teacher_topk.json         the metadata, written last: its presence means the split is complete

Parts are numbered by sample ranges fixed by the plan, not by process, so the merged dataset is the same
sample for sample whatever the number of processes and however often the run was interrupted. With a
``remote``, the plan is uploaded before any part, each finished part is uploaded by the process that wrote it
(shards, its ``index.json``, its ``part.json`` last: a part is complete on the remote when its ``part.json``
is there), and the merged index and the metadata follow. The remote then is the dataset: the local folders may
be different disks (one a node), each holding only the parts its processes wrote.
"""

import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Iterator, Mapping, Optional, Sequence

from streaming import MDSWriter
from streaming.base.storage.upload import CloudUploader

from composer_kd.data.json_files import read_json, remote_json, write_json
from composer_kd.data.staging import staged_folder
from composer_kd.data.teacher_topk import METADATA_FILE, TOKENS

__all__ = [
    'PLAN_FILE', 'PartWriter', 'complete_parts', 'merge_parts', 'part_name', 'publish_metadata', 'read_json',
    'remote_json', 'remote_parts', 'remove_partial_parts', 'upload_files', 'upload_part', 'write_json', 'write_part'
]

PLAN_FILE = 'precompute_plan.json'
PART_RECORD = 'part.json'
INDEX = 'index.json'
_THREADS = 16  # concurrent small downloads (a part's record or index) from the remote


def part_name(part: int) -> str:
    return f'part-{part:05d}'


def remote_parts(remote_split: str, parts: Sequence[int]) -> dict[int, dict[str, Any]]:
    """``{part: record}`` of the parts among ``parts`` that are complete on the remote (their ``part.json``,
    uploaded last, is there)."""
    with ThreadPoolExecutor(_THREADS) as pool:
        records = pool.map(lambda p: remote_json(os.path.join(remote_split, part_name(p), PART_RECORD)), parts)
        return {p: r for p, r in zip(parts, records) if r is not None}


def remove_partial_parts(split_dir: str) -> list[str]:
    """Removes the staging folders of parts that a killed run left behind; returns their names."""
    removed = []
    for name in sorted(os.listdir(split_dir)) if os.path.isdir(split_dir) else []:
        if name.startswith('.part-') and '.partial-' in name:
            shutil.rmtree(os.path.join(split_dir, name), ignore_errors=True)
            removed.append(name)
    return removed


def complete_parts(split_dir: str) -> dict[int, dict[str, Any]]:
    """``{part: record}`` of the parts that were written completely."""
    done = {}
    for name in os.listdir(split_dir) if os.path.isdir(split_dir) else []:
        record = read_json(os.path.join(split_dir, name, PART_RECORD)) if name.startswith('part-') else None
        if record is not None:
            done[record['part']] = record
    return done


class PartWriter:
    """Writes one part's samples through ``MDSWriter`` and counts them (see ``write_part``)."""

    def __init__(self, writer: MDSWriter, part: int, first: int) -> None:
        self.writer = writer
        self.part, self.first = part, first
        self.samples = 0
        self.tokens = 0

    def write(self, sample: Mapping[str, Any]) -> None:
        self.writer.write(sample)
        self.samples += 1
        self.tokens += len(sample[TOKENS])

    @property
    def record(self) -> dict[str, int]:
        """The part's ``part.json``."""
        return {'part': self.part, 'first': self.first, 'samples': self.samples, 'tokens': self.tokens}


@contextmanager
def write_part(split_dir: str, part: int, first: int, columns: Mapping[str, str],
               compression: Optional[str]) -> Iterator[PartWriter]:
    """Yields a ``PartWriter`` for part ``part`` (samples from ``first``); on success the part appears at once
    as ``split_dir/part-NNNNN`` with its record, on failure nothing of it remains."""
    os.makedirs(split_dir, exist_ok=True)
    with staged_folder(os.path.join(split_dir, part_name(part))) as staging:
        writer = PartWriter(MDSWriter(columns=dict(columns), out=staging, compression=compression), part, first)
        yield writer
        writer.writer.finish()
        write_json(os.path.join(staging, PART_RECORD), writer.record)


def upload_files(local: str, remote: str, names: Sequence[str]) -> None:
    """Copies the files ``names`` of the folder ``local`` to the folder ``remote``, in that order."""
    uploader = CloudUploader.get((local, remote), keep_local=True, exist_ok=True)
    for name in names:
        uploader.upload_file(name)


def upload_part(split_dir: str, remote_split: str, part: int) -> None:
    """Copies a complete part to ``remote_split``: its shards, its ``index.json``, then its ``part.json``, which
    marks it complete there."""
    local = os.path.join(split_dir, part_name(part))
    names = [n for n in os.listdir(local) if not n.startswith('.')]  # not the marker earlier versions wrote
    upload_files(local, os.path.join(remote_split, part_name(part)),
                 sorted(names, key=lambda n: ({INDEX: 1, PART_RECORD: 2}.get(n, 0), n)))


def merge_parts(split_dir: str, remote_split: Optional[str],
                records: Mapping[int, Mapping[str, Any]]) -> dict[str, int]:
    """Writes the split's ``index.json`` over the parts of ``records`` (``{part: record}``) in order, each part's
    index read from ``split_dir`` or else from ``remote_split`` (where the other nodes uploaded theirs), and
    uploads it with a remote; returns the totals ``{'samples', 'tokens', 'bytes', 'zip_bytes'}``.

    Raises:
        FileNotFoundError: for a part whose index is in neither folder.
    """
    parts = sorted(records)

    def index(part: int) -> dict[str, Any]:
        found = read_json(os.path.join(split_dir, part_name(part), INDEX))
        if found is None and remote_split:
            found = remote_json(os.path.join(remote_split, part_name(part), INDEX))
        if found is None:
            where = f'{split_dir} nor in {remote_split}' if remote_split else split_dir
            raise FileNotFoundError(f'{part_name(part)}/{INDEX} is not in {where}')
        return found

    with ThreadPoolExecutor(_THREADS) as pool:
        indexes = list(pool.map(index, parts))
    shards = []
    for part, part_index in zip(parts, indexes):
        for shard in part_index['shards']:  # file names relative to the split, as Streaming's merge_index does
            shards.append({key: {**value, 'basename': f'{part_name(part)}/{value["basename"]}'}
                           if key in ('raw_data', 'zip_data', 'raw_meta', 'zip_meta') and value else value
                           for key, value in shard.items()})
    write_json(os.path.join(split_dir, INDEX), {'version': 2, 'shards': shards}, indent=None)
    if remote_split:
        upload_files(split_dir, remote_split, [INDEX])
    return {
        'samples': sum(records[p]['samples'] for p in parts),
        'tokens': sum(records[p]['tokens'] for p in parts),
        'bytes': sum(s['raw_data']['bytes'] for s in shards),
        'zip_bytes': sum((s.get('zip_data') or s['raw_data'])['bytes'] for s in shards),
    }


def publish_metadata(split_dir: str, remote_split: Optional[str], metadata: Mapping[str, Any]) -> None:
    """Writes ``teacher_topk.json`` (the split is complete from this moment), and uploads it with a remote."""
    write_json(os.path.join(split_dir, METADATA_FILE), metadata)
    if remote_split:
        upload_files(split_dir, remote_split, [METADATA_FILE])

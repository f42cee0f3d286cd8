"""The on-disk layout of a ``precompute-teacher`` output split, written in parts so that it can be resumed.

::

    OUT/SPLIT/precompute_plan.json      the settings and part size, written first (a rerun must match it)
    OUT/SPLIT/part-00000/               samples [0, P): an MDS dataset, written all at once (staged, renamed)
              part-00000/part.json      its record: first sample, samples, tokens (written last, inside)
    OUT/SPLIT/part-00001/ ...
    OUT/SPLIT/index.json                Streaming's merge of the parts' indexes, in part order
    OUT/SPLIT/teacher_topk.json         the metadata, written last: its presence means the split is complete

Parts are numbered by sample ranges fixed by the plan, not by process, so the merged dataset is the same
sample for sample whatever the number of processes and however often the run was interrupted. With a
``remote``, each finished part is uploaded (shards first, its ``index.json`` last) and marked ``.uploaded``;
the merged index and the metadata follow.
"""

import json
import logging
import os
import shutil
from contextlib import contextmanager
from typing import Any, Iterator, Mapping, Optional, Sequence

from streaming import MDSWriter
from streaming.base.storage.upload import CloudUploader
from streaming.base.util import merge_index

from composer_kd.data.staging import staged_folder
from composer_kd.data.teacher_topk import METADATA_FILE, TOKENS

__all__ = [
    'PLAN_FILE', 'PartWriter', 'complete_parts', 'merge_parts', 'part_name', 'publish_metadata', 'read_json',
    'remove_partial_parts', 'upload_part', 'write_json', 'write_part'
]

PLAN_FILE = 'precompute_plan.json'
PART_RECORD = 'part.json'
UPLOADED = '.uploaded'


def part_name(part: int) -> str:
    return f'part-{part:05d}'


def read_json(path: str) -> Optional[dict[str, Any]]:
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def write_json(path: str, record: Any) -> None:
    """Writes ``record`` to ``path`` all at once (a temporary file, then a rename)."""
    tmp = f'{path}.tmp-{os.getpid()}'
    with open(tmp, 'w') as f:
        json.dump(record, f, indent=1)
    os.replace(tmp, path)


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

    def __init__(self, writer: MDSWriter) -> None:
        self.writer = writer
        self.samples = 0
        self.tokens = 0

    def write(self, sample: Mapping[str, Any]) -> None:
        self.writer.write(sample)
        self.samples += 1
        self.tokens += len(sample[TOKENS])


@contextmanager
def write_part(split_dir: str, part: int, first: int, columns: Mapping[str, str],
               compression: Optional[str]) -> Iterator[PartWriter]:
    """Yields a ``PartWriter`` for part ``part`` (samples from ``first``); on success the part appears at once
    as ``split_dir/part-NNNNN`` with its record, on failure nothing of it remains."""
    os.makedirs(split_dir, exist_ok=True)
    with staged_folder(os.path.join(split_dir, part_name(part))) as staging:
        writer = PartWriter(MDSWriter(columns=dict(columns), out=staging, compression=compression))
        yield writer
        writer.writer.finish()
        write_json(os.path.join(staging, PART_RECORD), {'part': part, 'first': first, 'samples': writer.samples,
                                                        'tokens': writer.tokens})


def upload_part(split_dir: str, remote_split: str, part: int) -> None:
    """Copies a complete part to ``remote_split`` (its shards, then its ``index.json``) and marks it uploaded."""
    local = os.path.join(split_dir, part_name(part))
    if os.path.isfile(os.path.join(local, UPLOADED)):
        return
    uploader = CloudUploader.get((local, os.path.join(remote_split, part_name(part))), keep_local=True,
                                 exist_ok=True)
    names = sorted(os.listdir(local), key=lambda n: (n == 'index.json', n))
    for name in names:
        uploader.upload_file(name)
    open(os.path.join(local, UPLOADED), 'w').close()


def merge_parts(split_dir: str, remote_split: Optional[str], parts: Sequence[int]) -> dict[str, int]:
    """Writes the split's ``index.json`` over the parts in order (uploaded too with a remote); returns the
    totals ``{'samples', 'tokens', 'bytes', 'zip_bytes'}``."""
    indexes = [os.path.join(split_dir, part_name(p), 'index.json') for p in parts]
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # merge_index warns about its temporary folder on the root logger
    try:
        if remote_split:
            merge_index([(i, os.path.join(remote_split, part_name(p), 'index.json')) for i, p in zip(indexes, parts)],
                        (split_dir, remote_split))
        else:
            merge_index(indexes, split_dir)
    finally:
        root.setLevel(level)
    with open(os.path.join(split_dir, 'index.json')) as f:
        shards = json.load(f)['shards']
    records = [read_json(os.path.join(split_dir, part_name(p), PART_RECORD)) for p in parts]
    return {
        'samples': sum(r['samples'] for r in records),
        'tokens': sum(r['tokens'] for r in records),
        'bytes': sum(s['raw_data']['bytes'] for s in shards),
        'zip_bytes': sum((s.get('zip_data') or s['raw_data'])['bytes'] for s in shards),
    }


def publish_metadata(split_dir: str, remote_split: Optional[str], metadata: Mapping[str, Any]) -> None:
    """Writes ``teacher_topk.json`` (the split is complete from this moment), and uploads it with a remote."""
    write_json(os.path.join(split_dir, METADATA_FILE), metadata)
    if remote_split:
        CloudUploader.get((split_dir, remote_split), keep_local=True, exist_ok=True).upload_file(METADATA_FILE)

"""``composer-kd samples RUN_DIR --hardest N``: the samples the student finds hardest relative to the teacher,
from ``per_sample_log``'s ``samples.csv``."""

import csv
import json
import math
import os
from typing import Any

from composer_kd.errors import ConfigError

__all__ = ['hardest_samples', 'format_hardest']

_MERGED, _DATASET = 'samples.csv', 'dataset.json'


def _folder(run_dir: str) -> str:
    for folder in (run_dir, os.path.join(run_dir, 'samples')):
        if os.path.isfile(os.path.join(folder, _MERGED)):
            return folder
    raise ConfigError(f'RUN_DIR: no {_MERGED} in {run_dir} or {os.path.join(run_dir, "samples")} (train with '
                      'callbacks.per_sample_log to write one)')


def _float(cell: str) -> float:
    return float(cell) if cell else math.nan


def hardest_samples(run_dir: str, count: int) -> list[dict[str, Any]]:
    """Each sample at its latest step, ranked by its KD term (the student's divergence from the teacher; by CE
    for a run without a teacher), highest first; ``source`` names its document when the train data has one.

    Raises:
        ConfigError: when there is no ``samples.csv`` or ``count`` is not positive.
    """
    if count < 1:
        raise ConfigError(f'--hardest must be a positive integer, got {count}')
    folder = _folder(run_dir)
    latest: dict[int, dict[str, Any]] = {}
    with open(os.path.join(folder, _MERGED), newline='') as f:
        for row in csv.DictReader(f):
            record = {'sample_id': int(row['sample_id']), 'step': int(row['step']), 'tokens': int(row['tokens']),
                      'ce': _float(row['ce']), 'kd': _float(row['kd']), 'top1_agreement': _float(row['top1_agreement'])}
            if record['step'] >= latest.get(record['sample_id'], {'step': -1})['step']:
                latest[record['sample_id']] = record
    key = 'kd' if any(not math.isnan(r['kd']) for r in latest.values()) else 'ce'
    ranked = sorted(latest.values(), key=lambda r: (-r[key], r['sample_id']))[:count]
    _add_sources(folder, ranked)
    return ranked


def _add_sources(folder: str, records: list[dict[str, Any]]) -> None:
    path = os.path.join(folder, _DATASET)
    if not os.path.isfile(path):
        return
    with open(path) as f:
        info = json.load(f)
    if not info.get('local') or not os.path.isfile(os.path.join(info['local'], info.get('split') or '',
                                                                'index.json')):
        return
    from streaming import StreamingDataset

    from composer_kd.data.streaming_resources import release_shared_memory
    dataset = StreamingDataset(local=info['local'], split=info.get('split') or None, shuffle=False, batch_size=1)
    try:
        for record in records:
            record['source'] = str(dataset[record['sample_id']].get('source', ''))
    finally:
        release_shared_memory(dataset)


def format_hardest(records: list[dict[str, Any]]) -> str:
    """A Markdown table of ``hardest_samples``'s records."""
    lines = ['| # | sample_id | step | tokens | KD | CE | top-1 agr. | source |', '|---' * 8 + '|']
    for i, r in enumerate(records, 1):
        lines.append(f'| {i} | {r["sample_id"]} | {r["step"]} | {r["tokens"]} | {r["kd"]:.4f} | {r["ce"]:.4f} | '
                     f'{r["top1_agreement"]:.3f} | {r.get("source", "")} |')
    return '\n'.join(lines)

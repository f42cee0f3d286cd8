"""Checks of a local MDS split against its ``index.json`` before a ``StreamingDataset`` opens it.

Streaming does not notice a truncated local shard (it reads samples past the cut short and trains on) and
reports a missing one deep in a worker; these checks name the file first.
"""

import json
import os

from composer_kd.errors import DataError

__all__ = ['check_mds_split']


def check_mds_split(local: str, split: str | None, remote: str | None = None) -> int:
    """Checks ``local/split/index.json`` and every shard it lists; returns the number of samples.

    A shard must be there (raw, or compressed) with the size the index records; with a ``remote``, shards not
    yet downloaded are skipped (Streaming fetches and checks them).

    Raises:
        DataError: naming the file, for an unreadable index, a missing or wrong-size shard, or an empty split.
    """
    folder = os.path.join(local, split or '')
    index = os.path.join(folder, 'index.json')
    try:
        with open(index) as f:
            shards = json.load(f)['shards']
        samples = sum(int(shard['samples']) for shard in shards)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f'{index}: not a readable MDS index ({type(e).__name__}: {str(e)[:120]})') from e
    if samples == 0:
        raise DataError(f'{folder}: the split is empty (index.json lists {len(shards)} shards and no samples)')
    for shard in shards:
        raw, zipped = shard['raw_data'], shard.get('zip_data')
        candidates = [(raw['basename'], raw['bytes'])] + ([(zipped['basename'], zipped['bytes'])] if zipped else [])
        present = [(name, size) for name, size in candidates if os.path.isfile(os.path.join(folder, name))]
        if not present:
            if remote is None:
                raise DataError(f'{os.path.join(folder, raw["basename"])}: shard listed in index.json is missing')
            continue
        name, size = present[0]
        actual = os.path.getsize(os.path.join(folder, name))
        if actual != size:
            raise DataError(f'{os.path.join(folder, name)}: shard is {actual} bytes, index.json says {size} '
                            '(truncated or overwritten)')
    return samples

"""Before an autoresume: the checkpoint folder as a killed or failed run left it → what Composer can resume.

Composer writes a checkpoint, then removes and recreates the ``latest`` link. A run killed (or out of disk)
while writing leaves a partial checkpoint newer than ``latest``; with ``save_overwrite: false`` (Composer's
default) Composer then refuses to resume ("conflicting files"), and a run killed between the link's removal
and its recreation would silently start again from step 0. This puts the folder right first: partial
checkpoints newer than the newest complete one are removed, and ``latest`` points at the newest complete one.

Complete means: a ``.pt`` that is a whole zip archive (``torch.save`` writes the central directory last), or a
sharded folder with its ``.metadata`` (written after every rank's shards). Only Composer's default names are
handled (``ep{epoch}-ba{batch}-rank{rank}.pt``, ``latest-rank{rank}.pt``).
"""

import logging
import os
import re
import shutil
import zipfile

__all__ = ['repair_checkpoint_folder']

log = logging.getLogger(__name__)

_CHECKPOINT = re.compile(r'ep(\d+)-ba(\d+)(-rank0\.pt)?')
LATEST = 'latest-rank0.pt'


def _complete(path: str, sharded: bool) -> bool:
    return os.path.isfile(os.path.join(path, '.metadata')) if sharded else zipfile.is_zipfile(path)


def repair_checkpoint_folder(folder: str) -> list[str]:
    """Removes partial checkpoints newer than the newest complete one and points ``latest-rank0.pt`` at it.

    Returns:
        list[str]: what was changed, one line each (empty when the folder was consistent or absent).
    """
    if not os.path.isdir(folder):
        return []
    found = []
    for name in os.listdir(folder):
        match = _CHECKPOINT.fullmatch(name)
        path = os.path.join(folder, name)
        if match is None or (match.group(3) is None) != os.path.isdir(path):
            continue
        sharded = match.group(3) is None
        found.append((int(match.group(2)), name, _complete(path, sharded), sharded))
    complete = [entry for entry in found if entry[2]]
    if not complete:
        return []
    newest_batch, newest, _, _ = max(complete)
    changes = []
    for batch, name, is_complete, sharded in found:
        if not is_complete and batch > newest_batch:
            path = os.path.join(folder, name)
            shutil.rmtree(path) if sharded else os.remove(path)
            changes.append(f'removed the partial checkpoint {path}')
    link = os.path.join(folder, LATEST)
    target = os.readlink(link) if os.path.islink(link) else None
    if target != newest:
        if os.path.lexists(link):
            os.remove(link)
        os.symlink(newest, link)
        changes.append(f'{link} -> {newest} (was {target or "missing"})')
    for change in changes:
        log.warning('checkpoint folder before autoresume: %s', change)
    return changes

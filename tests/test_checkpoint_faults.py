"""A checkpoint write that fails (disk full) or is cut by a kill: the error names the folder, the checkpoints
written before stay loadable, and autoresume puts the folder right and finishes bit-identically."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from reliability import record

from composer_kd.run.checkpoint_repair import repair_checkpoint_folder

TESTS = Path(__file__).resolve().parent


def _save(path: Path) -> None:
    torch.save({'x': torch.ones(3)}, path)


def test_repair_removes_partial_checkpoints_and_relinks_latest(tmp_path: Path) -> None:
    _save(tmp_path / 'ep0-ba2-rank0.pt')
    _save(tmp_path / 'ep0-ba4-rank0.pt')
    (tmp_path / 'ep0-ba6-rank0.pt').write_bytes(b'PK\x03\x04' + bytes(100))  # killed mid-write
    os.symlink('ep0-ba2-rank0.pt', tmp_path / 'latest-rank0.pt')  # killed before the link moved to ba4
    changes = repair_checkpoint_folder(str(tmp_path))
    assert not (tmp_path / 'ep0-ba6-rank0.pt').exists()
    assert os.readlink(tmp_path / 'latest-rank0.pt') == 'ep0-ba4-rank0.pt'
    assert len(changes) == 2 and repair_checkpoint_folder(str(tmp_path)) == []  # now consistent
    os.remove(tmp_path / 'latest-rank0.pt')  # killed between Composer's remove and symlink
    assert repair_checkpoint_folder(str(tmp_path)) == [f'{tmp_path / "latest-rank0.pt"} -> ep0-ba4-rank0.pt (was '
                                                       'missing)']


def test_repair_of_sharded_checkpoints(tmp_path: Path) -> None:
    for name, complete in (('ep0-ba2', True), ('ep0-ba4', False)):
        (tmp_path / name).mkdir()
        (tmp_path / name / '__0_0.distcp').write_bytes(b'x')
        if complete:
            (tmp_path / name / '.metadata').write_bytes(b'x')
    repair_checkpoint_folder(str(tmp_path))
    assert not (tmp_path / 'ep0-ba4').exists() and os.readlink(tmp_path / 'latest-rank0.pt') == 'ep0-ba2'
    assert repair_checkpoint_folder(str(tmp_path / 'missing')) == []


def _train(config: Path, *args: str, inject: int | None = None) -> subprocess.CompletedProcess:
    prefix = [str(TESTS / 'inject_enospc.py'), str(inject)] if inject else ['-m', 'composer_kd']
    return subprocess.run([sys.executable, *prefix, 'train', str(config), *args], capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
def test_disk_full_at_a_checkpoint_names_the_folder_and_the_rerun_finishes_bit_identically(tmp_path,
                                                                                            write_config) -> None:
    # save_overwrite: false, Composer's default: a partial file left behind would block the resume.
    config = write_config(**{'eval_loader': None, 'max_duration': '6ba', 'save_interval': '1ba', 'autoresume': True,
                             'save_overwrite': False, 'save_num_checkpoints_to_keep': -1, 'callbacks': {}})
    done = _train(config, 'run_name=reference')
    assert done.returncode == 0, done.stderr[-3000:]

    failed = _train(config, 'run_name=full', inject=3)  # the 3rd torch.save: the checkpoint of batch 3
    line = failed.stderr.strip().splitlines()[-1]
    folder = tmp_path / 'runs' / 'full' / 'checkpoints'
    assert failed.returncode == 1 and 'Traceback' not in failed.stderr, failed.stderr[-3000:]
    assert line == (f'composer-kd train: stopped: save_folder: a checkpoint could not be written to {folder} (No '
                    'space left on device); the checkpoints written before stay loadable: make room and rerun with '
                    'autoresume: true')
    assert os.readlink(folder / 'latest-rank0.pt') == 'ep0-ba2-rank0.pt'
    assert torch.load(folder / 'latest-rank0.pt', weights_only=False)['state']['timestamp']['Timestamp']['batch'] == 2
    assert not zipfile.is_zipfile(folder / 'ep0-ba3-rank0.pt')  # the partial file is there
    record('disk full (ENOSPC) while writing a checkpoint', line.replace(str(folder), '…/checkpoints'),
           lost='the steps since the last complete checkpoint (recomputed on resume)')

    resumed = _train(config, 'run_name=full')
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert 'removed the partial checkpoint' in resumed.stderr
    got = torch.load(folder / 'ep0-ba6-rank0.pt', weights_only=False)['state']['model']
    want = torch.load(tmp_path / 'runs' / 'reference' / 'checkpoints' / 'ep0-ba6-rank0.pt',
                      weights_only=False)['state']['model']
    assert all(torch.equal(got[k], want[k]) for k in want)
    record('rerun after a failed checkpoint write (save_overwrite: false)', 'the partial checkpoint is removed '
           '(logged), the run resumes from the last complete one and finishes', lost='nothing: bit-identical student')

"""``precompute-teacher`` as on several nodes with node-local disks: 2 processes under the ``composer`` launcher
whose ``precompute.out.local`` folders differ (each process sees only its own "disk"), and a local folder as
``precompute.out.remote``. The remote dataset equals the 1-process one sample for sample, also when the job is
SIGKILLed and started again (rank 0 plans from its own disk and the remote, for every rank)."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import kill_after_parts
from omegaconf import OmegaConf
from streaming import StreamingDataset

pytestmark = pytest.mark.launcher

REPO = Path(__file__).resolve().parents[1]


def _command(tmp_path: Path, tiny_assets: Path, local: str, *overrides: str) -> list[str]:
    """``composer -n 2 -m composer_kd precompute-teacher`` on the tiny val split with ``out.local=local`` and
    ``out.remote=tmp_path/remote`` (a short ``dist_timeout``: ranks that disagree fail fast instead of hanging)."""
    cfg = OmegaConf.load(REPO / 'yamls' / 'tiny-cpu-precompute.yaml')
    cfg.variables.assets = str(tiny_assets)
    cfg.precompute.dataset.split = 'val'
    cfg.precompute.out.local = local
    cfg.precompute.out.remote = str(tmp_path / 'remote')
    cfg.precompute.progress_bar = False
    cfg.dist_timeout = 60
    config = tmp_path / 'precompute.yaml'
    OmegaConf.save(cfg, config)
    logs = ['--stdout', str(tmp_path / 'rank{rank}.out'), '--stderr', str(tmp_path / 'rank{rank}.err')]
    return [sys.executable, '-m', 'composer.cli.launcher', '-n', '2', *logs, '-m', 'composer_kd',
            'precompute-teacher', str(config), *overrides]


def _run(tmp_path: Path, cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    errors = ''.join(p.read_text()[-3000:] for p in tmp_path.glob('rank*.err'))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + errors


def _assert_same_dataset(split: Path, reference: Path) -> None:
    got, want = (StreamingDataset(local=str(s), shuffle=False, batch_size=1) for s in (split, reference))
    assert got.num_samples == want.num_samples == 390
    for i in range(want.num_samples):  # sample for sample, every column, bit for bit
        a, b = got[i], want[i]
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), i


def _remote_records(split: Path) -> dict[str, int]:
    """The remote's complete parts (those with their ``part.json``) and that file's modification time."""
    return {p.parent.name: p.stat().st_mtime_ns for p in split.glob('part-*/part.json')}


def test_node_local_folders_with_a_remote(tmp_path: Path, tiny_assets: Path, tiny_topk: Path) -> None:
    # Each process writes to a folder of its own, as each node would to its own disk (an OmegaConf interpolation
    # of the launcher's RANK: the folders differ without anything precompute-teacher knows about).
    _run(tmp_path, _command(tmp_path, tiny_assets, str(tmp_path / 'node${oc.env:RANK}')))
    local = [sorted(p.name for p in (tmp_path / f'node{r}' / 'val').glob('part-*')) for r in (0, 1)]
    assert local[0] and local[1] and not set(local[0]) & set(local[1])  # each rank wrote its own parts
    remote = tmp_path / 'remote' / 'val'
    assert (remote / 'teacher_topk.json').is_file() and len(_remote_records(remote)) == 7
    _assert_same_dataset(remote, tiny_topk / 'val')


def test_node_local_folders_killed_and_resumed(tmp_path: Path, tiny_assets: Path, tiny_topk: Path) -> None:
    """SIGKILLed once parts are on the remote, then one part that only rank 1's disk holds (written, not yet
    uploaded when the node died) and rank 0's copy of one that the remote holds: the rerun keeps every complete
    part (uploads rank 1's, recomputes none of them) and the remote ends equal to the 1-process dataset."""
    cmd = _command(tmp_path, tiny_assets, str(tmp_path / 'node{rank}'), 'precompute.samples_per_part=8')
    remote = tmp_path / 'remote' / 'val'
    kill_after_parts(cmd, remote, 13, 120)  # 49 parts of 8 samples
    nodes = [tmp_path / f'node{r}' / 'val' for r in (0, 1)]
    assert not (remote / 'teacher_topk.json').exists()
    on_remote = _remote_records(remote)
    only_rank1 = next(p.name for p in sorted(nodes[1].glob('part-*')) if p.name in on_remote)
    for f in (remote / only_rank1).iterdir():
        f.unlink()
    del on_remote[only_rank1]
    lost_by_rank0 = next(p for p in sorted(nodes[0].glob('part-*')) if p.name in on_remote)
    for f in lost_by_rank0.iterdir():
        f.unlink()
    lost_by_rank0.rmdir()
    local = [{p.name: p.stat().st_ino for p in n.glob('part-*')} for n in nodes]
    assert len(on_remote) >= 8 and only_rank1 in local[1] and only_rank1 not in local[0]

    _run(tmp_path, cmd)
    after = _remote_records(remote)
    assert {k: after[k] for k in on_remote} == on_remote  # the remote's complete parts were not written again
    for before, n in zip(local, nodes):  # nor any part complete on a disk (rank 1's not-uploaded one included)
        assert {p.name: p.stat().st_ino for p in n.glob('part-*') if p.name in before} == before
        assert not list(n.glob('.part-*'))
    assert len(after) == 49 and (remote / 'teacher_topk.json').is_file()
    _assert_same_dataset(remote, tiny_topk / 'val')


def test_node_local_folders_without_a_remote_are_refused(tmp_path: Path, tiny_assets: Path) -> None:
    """Without a remote, rank 0 could never merge the parts the other ranks write to their own folders: the
    ranks stop with one line before any teacher loads."""
    cmd = _command(tmp_path, tiny_assets, str(tmp_path / 'node${oc.env:RANK}'), 'precompute.out.remote=null')
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    want = (f'composer-kd precompute-teacher: error: precompute.out.local is {tmp_path / "node0" / "val"} on rank 0 '
            f'but {tmp_path / "node1" / "val"} on rank 1: processes that write to different folders need '
            'precompute.out.remote (each uploads its parts there); without one, give every process the same folder')
    # Rank 1's stderr (the launcher stops rank 0 as soon as rank 1 exits, maybe before it prints its line).
    err = [line for line in (tmp_path / 'rank1.err').read_text().splitlines() if line.startswith('composer-kd')]
    assert err == [want], err

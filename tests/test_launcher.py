"""The real ``composer`` launcher with 2 CPU processes: DDP against a 1-process reference (kills and resumes of
DDP, FSDP2 and offline runs: ``test_kill_resume.py``), ``precompute-teacher`` on 2 processes (and with FSDP2, and
killed and restarted) writing the same dataset as on 1, offline distillation on 2 processes against 1, a sharded
teacher ensemble against 1 process, the fused LM-head loss sharded on 2 processes against the logits path on 1,
rounds and per-sample logs on 2 processes against 1. Slow (about 6 minutes on 2 cores)."""

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import assert_parts_kept, kill_after_parts, rounds_config
from omegaconf import OmegaConf
from reliability import record
from streaming import StreamingDataset

pytestmark = pytest.mark.launcher

# Full learning rate from the first batch, so that any difference in data order or gradients shows up.
COMMON = ['optimizer.lr=0.02', 'scheduler.t_warmup=0ba', 'eval_loader=null', 'log_to_console=false',
          'max_duration=12ba', 'save_interval=2ba']
# The file logger keeps 4 decimals. Sharded, replicated and single-process runs reduce gradients in different
# orders, and a dozen Adam steps grow that float noise to ~1e-3; the same layout before and after a resume
# must agree to the printed digit. (A wrong optimizer or scheduler state moves the loss ~1e-2 in one step.)
ACROSS_LAYOUTS = 2e-3
SAME_LAYOUT = 1e-4
FSDP = ['fsdp_config={sharding_strategy: FULL_SHARD, state_dict_type: sharded}', 'autoresume=true']


def _launcher(tmp_path: Path, nproc: int) -> list[str]:
    """``composer -n nproc -m composer_kd``; one process is the plain CLI, as a user runs it (and one Python start
    fewer than a launcher with one rank)."""
    if nproc == 1:
        return [sys.executable, '-m', 'composer_kd']
    logs = ['--stdout', str(tmp_path / 'rank{rank}.out'), '--stderr', str(tmp_path / 'rank{rank}.err')]
    return [sys.executable, '-m', 'composer.cli.launcher', '-n', str(nproc), *logs, '-m', 'composer_kd']


def _command(tmp_path: Path, nproc: int, config: Path, overrides: tuple[str, ...]) -> tuple[list[str], Path]:
    log = tmp_path / f'loss-{len(list(tmp_path.glob("loss-*")))}.txt'
    cmd = [
        *_launcher(tmp_path, nproc), 'train', str(config), *COMMON,
        f'loggers={{file: {{filename: {log}, flush_interval: 1}}}}', *overrides
    ]
    return cmd, log


def _losses(log: Path, name: str = 'loss/train/total') -> dict[int, float]:
    """``{batch: value}`` of one metric (default ``loss/train/total``) from a Composer file log."""
    found = re.findall(rf'\[batch=(\d+)\]: {re.escape(name)}: ([0-9.]+)', log.read_text())
    return {int(b): float(v) for b, v in found}


def _launch(tmp_path: Path, nproc: int, config: Path, *overrides: str, fsdp2: bool = False) -> dict[int, float]:
    """Runs ``composer -n nproc -m composer_kd train`` to the end and returns the losses it logged."""
    cmd, log = _command(tmp_path, nproc, config, overrides)
    env = dict(os.environ, FSDP_VERSION='2') if fsdp2 else dict(os.environ)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    errors = ''.join(p.read_text()[-3000:] for p in tmp_path.glob('rank*.err'))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + errors
    return _losses(log)


@pytest.fixture(scope='module')
def reference(tmp_path_factory: pytest.TempPathFactory, tiny_assets: Path) -> dict[int, float]:
    """One process, device batch 8 in two microbatches of 4."""
    tmp = tmp_path_factory.mktemp('reference')
    config = _copy_config(tmp, tiny_assets)
    return _launch(tmp, 1, config, 'save_folder=null')


def _copy_config(tmp: Path, tiny_assets: Path, recipe: str = 'tiny-cpu.yaml') -> Path:
    cfg = OmegaConf.load(Path(__file__).resolve().parents[1] / 'yamls' / recipe)
    cfg.variables.assets = str(tiny_assets)
    cfg.save_folder = str(tmp / 'runs' / '{run_name}' / 'checkpoints')
    path = tmp / 'config.yaml'
    OmegaConf.save(cfg, path)
    return path


def _assert_same_trajectory(got: dict[int, float], want: dict[int, float], tolerance: float) -> None:
    assert got and set(got) <= set(want)
    worst = max(abs(loss - want[batch]) for batch, loss in got.items())
    assert worst <= tolerance, f'max |difference| {worst:.4f}: got {sorted(got.items())}, want {sorted(want.items())}'


def test_ddp_two_processes_match_one(tmp_path: Path, tiny_assets: Path, reference: dict[int, float]) -> None:
    assert len(reference) == 12 and reference[11] < reference[0] - 0.3  # it learns: the comparison means something
    got = _launch(tmp_path, 2, _copy_config(tmp_path, tiny_assets), 'save_folder=null')
    _assert_same_trajectory(got, reference, ACROSS_LAYOUTS)
    assert len(got) == 12


def _precompute_command(tmp_path: Path, tiny_assets: Path, nproc: int, out: Path, *overrides: str,
                        fsdp2: bool = False) -> tuple[list[str], dict[str, str]]:
    """``composer -n nproc -m composer_kd precompute-teacher`` on the tiny val split, and its environment."""
    cfg = OmegaConf.load(Path(__file__).resolve().parents[1] / 'yamls' / 'tiny-cpu-precompute.yaml')
    cfg.variables.assets = str(tiny_assets)
    cfg.precompute.dataset.split = 'val'
    cfg.precompute.out.local = str(out)
    cfg.precompute.progress_bar = False
    config = tmp_path / f'{out.name}.yaml'
    OmegaConf.save(cfg, config)
    env = dict(os.environ, FSDP_VERSION='2') if fsdp2 else dict(os.environ)
    return [*_launcher(tmp_path, nproc), 'precompute-teacher', str(config), *overrides], env


def _precompute(tmp_path: Path, tiny_assets: Path, nproc: int, out: Path, *overrides: str, fsdp2: bool = False) -> Path:
    """Runs :func:`_precompute_command` to the end; returns the split folder."""
    cmd, env = _precompute_command(tmp_path, tiny_assets, nproc, out, *overrides, fsdp2=fsdp2)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    errors = ''.join(p.read_text()[-3000:] for p in tmp_path.glob('rank*.err'))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + errors
    return out / 'val'


def _samples(split: Path) -> list[dict]:
    dataset = StreamingDataset(local=str(split), shuffle=False, batch_size=1)
    return [dataset[i] for i in range(dataset.num_samples)]


def test_precompute_on_two_processes_writes_the_one_process_dataset(tmp_path: Path, tiny_assets: Path,
                                                                   tiny_topk: Path) -> None:
    """Also when the 2-process job is SIGKILLed mid-run and started again with the same command."""
    one = _samples(tiny_topk / 'val')  # the same recipe on 1 process
    assert len(one) == 390
    killed = _kill_precompute_and_rerun(tmp_path, tiny_assets)
    # FSDP2 with the teacher loaded on rank 0 only (init_device: mixed): rank 1 gets its shard from rank 0.
    for name, fsdp2, extra in (('two', False, ()), ('fsdp2', True, ('fsdp_config={state_dict_type: sharded}',
                                                                    'model.teacher.init_device=mixed'))):
        two = _samples(_precompute(tmp_path, tiny_assets, 2, tmp_path / name, *extra, fsdp2=fsdp2))
        for got, label in ((two, name), *(((killed, 'killed'),) if name == 'two' else ())):
            assert len(got) == len(one), label
            for a, b in zip(got, one):  # sample for sample, every column, bit for bit
                assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), (label, a['sample_index'])


def _kill_precompute_and_rerun(tmp_path: Path, tiny_assets: Path) -> list[dict]:
    """SIGKILLs a 2-process precompute (both ranks writing parts) once 13 parts are complete, reruns it, checks
    the complete parts were kept, and returns the finished dataset's samples."""
    cmd, env = _precompute_command(tmp_path, tiny_assets, 2, tmp_path / 'killed', 'precompute.samples_per_part=8')
    split = tmp_path / 'killed' / 'val'
    kept = kill_after_parts(cmd, split, 13, 300, env)
    assert 13 <= len(kept) < 49 and not (split / 'teacher_topk.json').exists()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert_parts_kept(split, kept)  # complete parts kept, the parts being written when killed gone
    record('SIGKILL of a 2-process precompute-teacher job (both ranks writing parts)', 'the same command finishes '
           f'it: the {len(kept)} complete parts kept, the parts being written discarded',
           lost='nothing: the dataset equals a 1-process run\'s, sample by sample')
    return _samples(split)


def test_offline_distillation_on_two_processes_matches_one(tmp_path: Path, tiny_assets: Path, tiny_topk: Path) -> None:
    topk = tiny_topk  # the 2-process precompute writes the same dataset (the test above)
    cfg = OmegaConf.load(Path(__file__).resolve().parents[1] / 'yamls' / 'tiny-cpu-offline.yaml')
    cfg.variables.assets = str(tiny_assets)
    cfg.variables.topk = str(topk)
    cfg.train_loader.dataset.split = 'val'
    config = tmp_path / 'offline.yaml'
    OmegaConf.save(cfg, config)
    one = _launch(tmp_path, 1, config, 'save_folder=null')
    two = _launch(tmp_path, 2, config, 'save_folder=null')
    assert len(one) == 12 and one[11] < one[0] - 0.3  # it learns
    _assert_same_trajectory(two, one, ACROSS_LAYOUTS)
    assert len(two) == 12
    # The fused LM-head loss against the top-k teacher, on 2 processes, follows the logits path.
    fused = _launch(tmp_path, 2, config, 'save_folder=null', 'model.distillation.fused_head=true')
    _assert_same_trajectory(fused, two, SAME_LAYOUT)
    assert len(fused) == 12


def test_ensemble_recipe_sharded_on_two_processes_matches_one(tmp_path: Path, tiny_assets: Path) -> None:
    """The shipped ensemble recipe: both teachers sharded by FSDP2 across 2 processes (one FSDP root for the
    ensemble, a unit per teacher and per block) train the student exactly as 1 process does."""
    config = _copy_config(tmp_path, tiny_assets, 'tiny-cpu-ensemble.yaml')
    one = _launch(tmp_path, 1, config, 'save_folder=null')
    two = _launch(tmp_path, 2, config, 'save_folder=null', FSDP[0], fsdp2=True)
    assert len(one) == 12 and one[11] < one[0] - 0.3  # it learns
    _assert_same_trajectory(two, one, ACROSS_LAYOUTS)
    assert len(two) == 12


def test_fused_head_sharded_on_two_processes_matches_the_logits_path(tmp_path: Path, tiny_assets: Path,
                                                                     reference: dict[int, float]) -> None:
    """``fused_head: true`` with student and teacher sharded by FSDP2 across 2 processes (the heads' weights
    gathered inside their calls, the tied embedding's gradient through the loss) follows the 1-process logits
    path's trajectory."""
    config = _copy_config(tmp_path, tiny_assets)
    two = _launch(tmp_path, 2, config, 'save_folder=null', 'model.distillation.fused_head=true', FSDP[0], fsdp2=True)
    _assert_same_trajectory(two, reference, ACROSS_LAYOUTS)
    assert len(two) == 12


def test_rounds_on_two_processes_match_one(tmp_path: Path, tiny_assets: Path) -> None:
    """Two rounds under the launcher (DDP): each round's student and the second round's teacher (the first
    round's student, exported by rank 0 and read by both) give the 1-process run's eval metrics."""
    records = {}
    for nproc in (1, 2):
        config = rounds_config(tmp_path / f'n{nproc}', tiny_assets)
        # The whole val split: 1 eval batch a rank would be twice the samples on 2 processes.
        proc = subprocess.run([*_launcher(tmp_path / f'n{nproc}', nproc), 'rounds', str(config),
                               'eval_subset_num_batches=-1'], capture_output=True, text=True, timeout=600)
        errors = ''.join(p.read_text()[-3000:] for p in (tmp_path / f'n{nproc}').glob('rank*.err'))
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + errors
        records[nproc] = json.loads((tmp_path / f'n{nproc}' / 'rounds' / 'rounds.json').read_text())
    for one, two in zip(records[1], records[2]):
        assert two['steps'] == one['steps'] == 4
        for name, value in one['eval'].items():
            assert abs(two['eval'][name] - value) <= ACROSS_LAYOUTS * max(1.0, abs(value)), (one['round'], name)


def test_per_sample_log_on_two_processes_matches_one(tmp_path: Path, tiny_assets: Path) -> None:
    """An epoch of the val split with per_sample_log (lr 0, so a sample's values do not depend on when it is
    seen): on 2 processes every sample appears once, on one of the two ranks, with the 1-process values."""
    values = {}
    for nproc in (1, 2):
        folder = tmp_path / f'samples{nproc}'
        config = _copy_config(tmp_path, tiny_assets)
        _launch(tmp_path, nproc, config, 'save_folder=null', 'train_loader.dataset.split=val',
                'global_train_batch_size=10', 'device_train_microbatch_size=5', 'max_duration=1ep', 'optimizer.lr=0',
                f'callbacks={{per_sample_log: {{folder: {folder}}}}}')
        rows = list(csv.DictReader((folder / 'samples.csv').open()))
        assert sorted(int(r['sample_id']) for r in rows) == list(range(390)), nproc
        assert {r['rank'] for r in rows} == {str(rank) for rank in range(nproc)}
        values[nproc] = {int(r['sample_id']): (float(r['ce']), float(r['kd']), float(r['top1_agreement']))
                         for r in rows}
    for sample_id, want in values[1].items():
        assert values[2][sample_id] == pytest.approx(want, rel=1e-5, abs=1e-6), sample_id


def test_kd_monitor_on_two_processes_matches_one(tmp_path: Path, tiny_assets: Path) -> None:
    """kd_monitor sums its statistics over ranks: 2 processes log what 1 process logs for the same batches."""
    logs = {}
    for nproc in (1, 2):
        (tmp_path / f'n{nproc}').mkdir()
        config = _copy_config(tmp_path / f'n{nproc}', tiny_assets)
        cmd, log = _command(tmp_path / f'n{nproc}', nproc, config, ('save_folder=null', 'max_duration=4ba',
                                                                      'callbacks={kd_monitor: {interval: 2}}'))
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        logs[nproc] = log
    for name in ('ce', 'kd', 'student_entropy', 'teacher_entropy', 'top1_agreement'):
        one, two = (_losses(logs[n], f'kd/train/{name}') for n in (1, 2))
        assert sorted(one) == [0, 2] and sorted(two) == [0, 2], name
        _assert_same_trajectory(two, one, ACROSS_LAYOUTS)

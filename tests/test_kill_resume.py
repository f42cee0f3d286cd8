"""Killed anywhere, resumed bit-identically: 2-process runs (DDP, FSDP2 sharded, and DDP from a precomputed
teacher) SIGKILLed at random moments — between steps, mid-step, while a checkpoint is written — and restarted
each time with autoresume end with a student and optimizer state ``torch.equal`` to an uninterrupted run's, and
with every (step, sample) of the per-sample log exactly once. SIGTERM to the whole job (as schedulers send it)
checkpoints at the next step, exits, and resumes the same way."""

import csv
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
import torch.distributed.checkpoint as dcp
from omegaconf import OmegaConf
from reliability import record
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

pytestmark = pytest.mark.launcher

STEPS = 12
REPO = Path(__file__).resolve().parents[1]
KILLS = {'ddp': 2, 'fsdp2': 2, 'offline': 2}  # random moments per mode (~15 s a restart on 2 cores; CI time)
MODES = {
    'ddp': ('tiny-cpu.yaml', {}),
    'fsdp2': ('tiny-cpu.yaml', {'fsdp_config': {'sharding_strategy': 'FULL_SHARD', 'state_dict_type': 'sharded'}}),
    'offline': ('tiny-cpu-offline.yaml', {}),
}


@pytest.fixture(scope='module')
def ddp_reference(tmp_path_factory: pytest.TempPathFactory, tiny_assets: Path) -> Path:
    """An uninterrupted 2-process DDP run (the kill and the SIGTERM tests compare against it): its run folder."""
    tmp = tmp_path_factory.mktemp('ddp-reference')
    _run(tmp, _config(tmp, tiny_assets, 'ddp', None), 'reference', 'ddp')
    return tmp / 'runs' / 'reference'


def _reference(tmp_path: Path, config: Path, mode: str, request: pytest.FixtureRequest) -> None:
    """``tmp_path/runs/reference``: the shared DDP run (checkpoint interval aside, the same recipe), or a new one."""
    if mode == 'ddp':
        (tmp_path / 'runs').mkdir(exist_ok=True)
        (tmp_path / 'runs' / 'reference').symlink_to(request.getfixturevalue('ddp_reference'))
    else:
        _run(tmp_path, config, 'reference', mode)


def _config(tmp_path: Path, tiny_assets: Path, mode: str, topk: Path | None) -> Path:
    recipe, edits = MODES[mode]
    cfg = OmegaConf.load(REPO / 'yamls' / recipe)
    cfg.variables.assets = str(tiny_assets)
    if mode == 'offline':
        cfg.variables.topk = str(topk)
        cfg.train_loader.dataset.split = 'val'
    runs = tmp_path / 'runs' / '{run_name}'
    cfg.save_folder = str(runs / 'checkpoints')
    cfg.update({'eval_loader': None, 'max_duration': f'{STEPS}ba', 'save_interval': '1ba', 'autoresume': True,
                'save_num_checkpoints_to_keep': -1, 'save_overwrite': False, 'log_to_console': True,
                'progress_bar': False, 'console_log_interval': '1ba',
                'callbacks': {'per_sample_log': {'folder': str(runs / 'samples')}}, **edits})
    path = tmp_path / 'config.yaml'
    OmegaConf.save(cfg, path)
    return path


def _command(tmp_path: Path, config: Path, run_name: str) -> list[str]:
    logs = ['--stdout', str(tmp_path / f'{run_name}-rank{{rank}}.out'),
            '--stderr', str(tmp_path / f'{run_name}-rank{{rank}}.err')]
    return [sys.executable, '-m', 'composer.cli.launcher', '-n', '2', *logs, '-m', 'composer_kd', 'train',
            str(config), f'run_name={run_name}']


def _env(mode: str) -> dict[str, str]:
    return dict(os.environ, FSDP_VERSION='2') if mode == 'fsdp2' else dict(os.environ)


def _run(tmp_path: Path, config: Path, run_name: str, mode: str) -> None:
    done = subprocess.run(_command(tmp_path, config, run_name), capture_output=True, text=True, timeout=600,
                          env=_env(mode))
    errors = ''.join(p.read_text()[-3000:] for p in tmp_path.glob(f'{run_name}-rank*.err'))
    assert done.returncode == 0, done.stdout[-2000:] + errors


def _latest_batch(checkpoints: Path) -> int:
    link = checkpoints / 'latest-rank0.pt'
    return int(os.readlink(link).split('-ba')[1].split('-')[0]) if link.is_symlink() else 0


def _final(checkpoints: Path, tmp_path: Path) -> dict[str, Any]:
    path = checkpoints / f'ep0-ba{STEPS}'
    if path.is_dir():  # sharded: gather it into one file
        dcp_to_torch_save(str(path), str(tmp_path / 'gathered.pt'))
        return torch.load(tmp_path / 'gathered.pt', weights_only=False)['state']
    return torch.load(checkpoints / f'ep0-ba{STEPS}-rank0.pt', weights_only=False)['state']


def _assert_equal(got: Any, want: Any, where: str = 'state') -> None:
    """Every tensor ``torch.equal``, every other value ``==``, recursively (wall-clock times aside)."""
    if isinstance(want, dict):
        assert got.keys() == want.keys(), where
        for key in want:
            if not str(key).endswith('wct'):
                _assert_equal(got[key], want[key], f'{where}.{key}')
    elif torch.is_tensor(want):
        assert torch.equal(got, want), where
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            _assert_equal(g, w, f'{where}[{i}]')
    else:
        assert got == want, where


def _samples(tmp_path: Path, run_name: str) -> list[tuple[int, int]]:
    rows = csv.DictReader((tmp_path / 'runs' / run_name / 'samples' / 'samples.csv').open())
    return [(int(r['step']), int(r['sample_id'])) for r in rows]


def _compare(tmp_path: Path, run_name: str) -> None:
    got = _final(tmp_path / 'runs' / run_name / 'checkpoints', tmp_path)
    want = _final(tmp_path / 'runs' / 'reference' / 'checkpoints', tmp_path)
    for key in ('model', 'optimizers', 'schedulers', 'timestamp'):
        _assert_equal(got[key], want[key], key)
    samples = _samples(tmp_path, run_name)
    assert len(samples) == len(set(samples)) and sorted(samples) == sorted(_samples(tmp_path, 'reference'))


def _start(tmp_path: Path, config: Path, run_name: str, mode: str,
           output: Any = subprocess.DEVNULL) -> subprocess.Popen:
    return subprocess.Popen(_command(tmp_path, config, run_name), start_new_session=True, env=_env(mode),
                            stdout=output, stderr=subprocess.STDOUT)


@pytest.mark.parametrize('mode', list(MODES))
def test_killed_at_random_moments_resumes_bit_identically(tmp_path: Path, tiny_assets: Path, mode: str,
                                                           request: pytest.FixtureRequest) -> None:
    config = _config(tmp_path, tiny_assets, mode, request.getfixturevalue('tiny_topk') if mode == 'offline' else None)
    _reference(tmp_path, config, mode, request)
    checkpoints = tmp_path / 'runs' / 'killed' / 'checkpoints'
    rng = random.Random(f'{mode}-10')
    kills: list[int] = []
    while len(kills) < KILLS[mode]:
        # Wait for a random checkpoint to complete, then a random 0–400 ms: between steps, mid-step or mid-write.
        target = min(STEPS - 1, _latest_batch(checkpoints) + rng.randint(1, 2))
        proc = _start(tmp_path, config, 'killed', mode)
        deadline = time.monotonic() + 300
        while _latest_batch(checkpoints) < target and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.4))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if proc.returncode != -signal.SIGKILL or _latest_batch(checkpoints) >= STEPS:
            break  # finished before the kill: nothing left to interrupt
        kills.append(_latest_batch(checkpoints))
    assert len(kills) == KILLS[mode], kills  # two kills cannot reach the end of 12 steps
    _run(tmp_path, config, 'killed', mode)
    _compare(tmp_path, 'killed')
    if mode == 'fsdp2':  # the sharded checkpoint holds the student only
        keys = dcp.FileSystemReader(str(checkpoints / f'ep0-ba{STEPS}')).read_metadata().state_dict_metadata
        assert any(k.startswith('state.model.model.') for k in keys) and not [k for k in keys if 'teacher' in k]
    record(f'SIGKILL of a 2-process {mode} run at {len(kills)} random moments (latest complete checkpoint each '
           f'time: batch {", ".join(map(str, kills))})', 'the same command resumes from the latest complete '
           'checkpoint each time', lost='nothing: student, optimizer and scheduler bit-identical to an '
           'uninterrupted run, every (step, sample) once; the steps since the last checkpoint are recomputed')


def test_sigterm_to_the_job_checkpoints_exits_and_resumes_bit_identically(tmp_path: Path, tiny_assets: Path,
                                                                          request: pytest.FixtureRequest) -> None:
    config = _config(tmp_path, tiny_assets, 'ddp', None)
    config_text = config.read_text().replace("save_interval: 1ba", "save_interval: 100ba")
    assert config_text != config.read_text()
    config.write_text(config_text)
    _reference(tmp_path, config, 'ddp', request)
    log = tmp_path / 'launcher.log'  # rank 0 prints through the launcher; the other ranks to their files
    with log.open('w') as out:
        proc = _start(tmp_path, config, 'preempted', 'ddp', out)

    def output() -> str:
        return log.read_text()

    deadline = time.monotonic() + 300
    while '[batch=4/12]' not in output() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    ranks = psutil.Process(proc.pid).children()
    sent = time.monotonic()
    os.killpg(proc.pid, signal.SIGTERM)  # a scheduler signals every process of the job
    proc.wait()
    gone, alive = psutil.wait_procs(ranks, timeout=120)
    waited = time.monotonic() - sent
    # The ranks are the launcher's children, so their exit codes are not ours to read (exit 0 of one process:
    # test_preemption.py); that they stopped, cleanly and with the checkpoint, is.
    assert not alive and len(gone) == 2
    assert 'Traceback' not in (tmp_path / 'preempted-rank1.err').read_text()
    # Composer's launcher turns its own SIGTERM into SystemExit(143) (one traceback of its own), signals the ranks
    # and waits up to 30 s for them before SIGKILL: the step and checkpoint must fit in that grace period.
    assert output().count('Traceback') == output().count('SystemExit: 143') <= 1
    saved = sorted((tmp_path / 'runs' / 'preempted' / 'checkpoints').glob('ep*-ba*-rank0.pt'))
    assert len(saved) == 1
    stopped_at = int(saved[0].name.split('-ba')[1].split('-')[0])
    assert 4 <= stopped_at < STEPS
    assert 'SIGTERM: stopping after batch' in output()
    _run(tmp_path, config, 'preempted', 'ddp')
    _compare(tmp_path, 'preempted')
    record('SIGTERM to a 2-process job (launcher and ranks), as a scheduler sends it',
           f'both ranks stop, without a traceback, within {waited:.1f} s with the checkpoint of batch {stopped_at}; '
           'the same command resumes there', lost='nothing: bit-identical to an uninterrupted run, every (step, '
           'sample) once')

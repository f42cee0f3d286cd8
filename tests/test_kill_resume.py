"""SIGKILL at random moments of a 2-process DDP run (between steps, mid-step, while a checkpoint is written),
restarted each time with autoresume: the final student and optimizer are bit-identical to an uninterrupted
run's."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from reliability import record

pytestmark = pytest.mark.launcher

STEPS = 12


def _config(tmp_path: Path, tiny_assets: Path) -> Path:
    cfg = OmegaConf.load(Path(__file__).resolve().parents[1] / 'yamls' / 'tiny-cpu.yaml')
    cfg.variables.assets = str(tiny_assets)
    cfg.save_folder = str(tmp_path / 'runs' / '{run_name}' / 'checkpoints')
    cfg.update({'eval_loader': None, 'max_duration': f'{STEPS}ba', 'save_interval': '1ba', 'autoresume': True,
                'save_num_checkpoints_to_keep': -1, 'log_to_console': False, 'callbacks': {}})
    path = tmp_path / 'config.yaml'
    OmegaConf.save(cfg, path)
    return path


def _command(tmp_path: Path, config: Path, run_name: str) -> list[str]:
    logs = ['--stdout', str(tmp_path / 'rank{rank}.out'), '--stderr', str(tmp_path / 'rank{rank}.err')]
    return [sys.executable, '-m', 'composer.cli.launcher', '-n', '2', *logs, '-m', 'composer_kd', 'train',
            str(config), f'run_name={run_name}']


def _latest_batch(checkpoints: Path) -> int:
    link = checkpoints / 'latest-rank0.pt'
    return int(os.readlink(link).split('-ba')[1].split('-')[0]) if link.is_symlink() else 0


def _final(checkpoints: Path) -> dict:
    return torch.load(checkpoints / f'ep0-ba{STEPS}-rank0.pt', weights_only=False)['state']


def test_ddp_killed_at_random_moments_resumes_bit_identically(tmp_path: Path, tiny_assets: Path) -> None:
    config = _config(tmp_path, tiny_assets)
    done = subprocess.run(_command(tmp_path, config, 'reference'), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    checkpoints = tmp_path / 'runs' / 'killed' / 'checkpoints'
    rng = random.Random(10)
    kills = []
    while len(kills) < 3:
        # Wait for a random checkpoint to complete, then a random 0–400 ms: between steps, mid-step or mid-write.
        target = min(STEPS - 1, _latest_batch(checkpoints) + rng.randint(1, 3))
        proc = subprocess.Popen(_command(tmp_path, config, 'killed'), start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while _latest_batch(checkpoints) < target and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.4))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if proc.returncode != -signal.SIGKILL or _latest_batch(checkpoints) >= STEPS:
            break  # finished before the kill: nothing left to interrupt
        kills.append(_latest_batch(checkpoints))
    assert len(kills) >= 2, kills
    done = subprocess.run(_command(tmp_path, config, 'killed'), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    got, want = _final(checkpoints), _final(tmp_path / 'runs' / 'reference' / 'checkpoints')
    assert all(torch.equal(got['model'][k], want['model'][k]) for k in want['model'])
    got_opt, want_opt = (next(iter(s['optimizers'].values()))['state'] for s in (got, want))
    assert all(torch.equal(got_opt[i][k], want_opt[i][k]) for i in want_opt for k in want_opt[i])
    assert got['schedulers'] == want['schedulers']
    record(f'SIGKILL of a 2-process DDP run at {len(kills)} random moments (latest checkpoints then: {kills})',
           'the same command resumes from the latest complete checkpoint each time',
           lost='nothing: student and optimizer bit-identical to an uninterrupted run (at most the steps since '
           'the last checkpoint are recomputed)')

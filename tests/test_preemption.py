"""Preemption: SIGTERM ends a run at the next step boundary with a checkpoint and exit 0, and the rerun resumes
to a student (and optimizer) bit-identical to an uninterrupted run."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from reliability import record

pytestmark = pytest.mark.launcher  # real processes, signals and restarts (slow)


def _command(config: Path, *overrides: str) -> list[str]:
    return [sys.executable, '-m', 'composer_kd', 'train', str(config), *overrides]


def _final_state(folder: Path, batch: int) -> dict:
    return torch.load(next(folder.rglob(f'ep*-ba{batch}-rank0.pt')), weights_only=False)['state']


def _assert_same_state(a: dict, b: dict) -> None:
    assert a['model'].keys() == b['model'].keys()
    assert all(torch.equal(a['model'][k], b['model'][k]) for k in a['model'])
    moments_a = next(iter(a['optimizers'].values()))['state']
    moments_b = next(iter(b['optimizers'].values()))['state']
    for i in moments_a:
        assert all(torch.equal(moments_a[i][k], moments_b[i][k]) for k in moments_a[i])
    assert a['schedulers'] == b['schedulers']
    progress = [{k: v for k, v in s['timestamp']['Timestamp'].items() if not k.endswith('wct')} for s in (a, b)]
    assert progress[0] == progress[1]  # wall-clock fields aside


def test_sigterm_checkpoints_at_the_next_step_and_the_rerun_resumes_bit_identically(tmp_path, write_config) -> None:
    edits = {'eval_loader': None, 'max_duration': '12ba', 'save_interval': '100ba', 'autoresume': True,
             'save_num_checkpoints_to_keep': -1, 'progress_bar': False, 'log_to_console': True,
             'console_log_interval': '1ba', 'callbacks': {}}
    config = write_config(**edits)
    reference = subprocess.run(_command(config, 'run_name=reference'), capture_output=True, text=True, timeout=600)
    assert reference.returncode == 0, reference.stderr[-2000:]

    proc = subprocess.Popen(_command(config, 'run_name=preempted'), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, 'PYTHONUNBUFFERED': '1'})
    assert proc.stdout is not None
    for line in proc.stdout:  # Composer's console logger prints each batch (to stderr, merged here)
        if '[batch=3/12]' in line:
            break
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    err, _ = proc.communicate(timeout=120)
    waited = time.monotonic() - sent
    assert proc.returncode == 0, err[-2000:]
    assert 'Traceback' not in err
    saved = sorted((tmp_path / 'runs' / 'preempted').rglob('ep*-ba*-rank0.pt'))
    assert len(saved) == 1
    stopped_at = int(saved[0].name.split('-ba')[1].split('-')[0])
    assert 3 <= stopped_at < 12, (stopped_at, err[-3000:])
    record('SIGTERM mid-run (preemption)', f'exit 0 after {waited:.1f} s; checkpoint of batch {stopped_at} written '
           '("SIGTERM: stopping after batch …" in the log)', lost='nothing: the rerun resumes there')

    resumed = subprocess.run(_command(config, 'run_name=preempted'), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    _assert_same_state(_final_state(tmp_path / 'runs' / 'preempted', 12),
                       _final_state(tmp_path / 'runs' / 'reference', 12))
    record('rerun after SIGTERM (autoresume)', 'resumes from the checkpoint and finishes',
           lost='nothing: student, optimizer, scheduler and timestamp bit-identical to an uninterrupted run')

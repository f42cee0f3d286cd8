"""On-policy distillation with the real ``composer`` launcher: 2 processes (DDP and FSDP2) sample the continuations
1 process samples and train the same student; a run SIGKILLed and autoresumed samples what the uninterrupted run
sampled and ends bit-identical; ranks whose rows end at different lengths do not hang generation."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf
from test_kill_resume import _assert_equal
from test_launcher import ACROSS_LAYOUTS, _assert_same_trajectory, _losses

pytestmark = pytest.mark.launcher

REPO = Path(__file__).resolve().parents[1]
STEPS = 6


def _config(tmp: Path, tiny_assets: Path, **edits: Any) -> Path:
    cfg = OmegaConf.load(REPO / 'yamls' / 'tiny-cpu-on-policy.yaml')
    cfg.variables.assets = str(tiny_assets)
    cfg.update({'eval_loader': None, 'max_duration': f'{STEPS}ba', 'save_folder': str(tmp / 'ckpt'),
                'save_interval': '2ba', 'save_num_checkpoints_to_keep': -1, 'save_overwrite': False,
                'autoresume': True, 'log_to_console': False, 'callbacks': {'kd_monitor': {'interval': 1}},
                'loggers': {'file': {'filename': str(tmp / 'log.txt'), 'flush_interval': 1}}, **edits})
    cfg.model.distillation.on_policy.sample_log = str(tmp / 'samples')
    cfg.optimizer.lr = 0.01
    path = tmp / 'config.yaml'
    OmegaConf.save(cfg, path)
    return path


def _command(tmp: Path, nproc: int, config: Path) -> list[str]:
    if nproc == 1:  # the plain CLI, as a user runs one process (a launcher with one rank is one Python start more)
        return [sys.executable, '-m', 'composer_kd', 'train', str(config)]
    logs = ['--stdout', str(tmp / 'rank{rank}.out'), '--stderr', str(tmp / 'rank{rank}.err')]
    return [sys.executable, '-m', 'composer.cli.launcher', '-n', str(nproc), *logs, '-m', 'composer_kd', 'train',
            str(config)]


def _env(fsdp2: bool) -> dict[str, str]:
    return dict(os.environ, FSDP_VERSION='2') if fsdp2 else dict(os.environ)


def _run(tmp: Path, nproc: int, config: Path, fsdp2: bool = False) -> None:
    done = subprocess.run(_command(tmp, nproc, config), capture_output=True, text=True, timeout=600, env=_env(fsdp2))
    errors = ''.join(p.read_text()[-3000:] for p in tmp.glob('rank*.err'))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:] + errors


def _samples(tmp: Path) -> dict[tuple[int, int], tuple[str, tuple[int, ...]]]:
    """``{(step, sample id): (policy, tokens)}`` over every rank's sample log (a replayed step must repeat itself)."""
    found: dict[tuple[int, int], tuple[str, tuple[int, ...]]] = {}
    for path in (tmp / 'samples').glob('rollouts-rank*.jsonl'):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            key, value = (row['step'], row['sample_id']), (row['policy'], tuple(row['tokens']))
            assert found.setdefault(key, value) == value, f'{key} sampled twice, differently'
    return found


@pytest.fixture(scope='module')
def one_process(tmp_path_factory: pytest.TempPathFactory, tiny_assets: Path) -> Path:
    tmp = tmp_path_factory.mktemp('on-policy-1')
    _run(tmp, 1, _config(tmp, tiny_assets))
    return tmp


@pytest.mark.parametrize('fsdp2', [False, True], ids=['ddp', 'fsdp2'])
def test_two_processes_sample_and_train_what_one_does(tmp_path: Path, tiny_assets: Path, one_process: Path,
                                                      fsdp2: bool) -> None:
    edits = {'fsdp_config': {'sharding_strategy': 'FULL_SHARD', 'state_dict_type': 'sharded'}} if fsdp2 else {}
    _run(tmp_path, 2, _config(tmp_path, tiny_assets, **edits), fsdp2)
    want, got = _samples(one_process), _samples(tmp_path)
    assert len(want) == STEPS * 8 and got == want
    assert {policy for policy, _ in want.values()} == {'student', 'dataset'}
    _assert_same_trajectory(_losses(tmp_path / 'log.txt'), _losses(one_process / 'log.txt'), ACROSS_LAYOUTS)


def _latest_batch(checkpoints: Path) -> int:
    link = checkpoints / 'latest-rank0.pt'
    return int(os.readlink(link).split('-ba')[1].split('-')[0]) if link.is_symlink() else 0


def test_killed_and_autoresumed_samples_and_ends_as_the_uninterrupted_run(tmp_path: Path, tiny_assets: Path,
                                                                         one_process: Path) -> None:
    config = _config(tmp_path, tiny_assets)
    proc = subprocess.Popen(_command(tmp_path, 1, config), start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while _latest_batch(tmp_path / 'ckpt') < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(0.3)  # into step 3 (or 4): what it sampled there is sampled again after the resume
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and 2 <= _latest_batch(tmp_path / 'ckpt') < STEPS
    _run(tmp_path, 1, config)
    assert _samples(tmp_path) == _samples(one_process)  # every replayed step sampled the same continuations
    got = torch.load(tmp_path / 'ckpt' / f'ep0-ba{STEPS}-rank0.pt', weights_only=False)['state']
    want = torch.load(one_process / 'ckpt' / f'ep0-ba{STEPS}-rank0.pt', weights_only=False)['state']
    for key in ('model', 'optimizers', 'schedulers', 'timestamp'):
        _assert_equal(got[key], want[key], key)


def test_ranks_that_end_at_different_lengths_do_not_hang(tmp_path: Path, tiny_assets: Path) -> None:
    # Under FSDP2 every decode step gathers the sharded weights on every rank: rank 0's rows all end at once (EOS
    # forced), rank 1's never do; synced_gpus keeps rank 0 stepping until rank 1 is done.
    script = REPO / 'tests' / 'on_policy_uneven.py'
    done = subprocess.run([sys.executable, '-m', 'composer.cli.launcher', '-n', '2', '--stdout',
                           str(tmp_path / 'rank{rank}.out'), '--stderr', str(tmp_path / 'rank{rank}.err'),
                           str(script), str(tiny_assets), str(tmp_path / 'out')], env=_env(True), capture_output=True,
                          text=True, timeout=300)
    errors = ''.join(p.read_text()[-3000:] for p in tmp_path.glob('rank*.err'))
    assert done.returncode == 0, done.stdout[-2000:] + errors
    lengths = [json.loads((tmp_path / f'out.rank{r}').read_text()) for r in (0, 1)]
    assert lengths[0] == [1] * 4 and lengths[1] == [12] * 4

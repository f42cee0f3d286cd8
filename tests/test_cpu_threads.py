"""Ranks on one CPU node share its cores (``composer_kd/run/cpu_threads.py``)."""

import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterator

import pytest
import torch

from composer_kd.run import cpu_threads
from composer_kd.run.cpu_threads import share_cpu_cores, threads_per_rank


def test_each_rank_gets_its_share_and_at_least_one_thread() -> None:
    assert threads_per_rank(16, 8) == 2
    assert threads_per_rank(16, 3) == 5
    assert threads_per_rank(2, 2) == 1
    assert threads_per_rank(2, 8) == 1
    assert threads_per_rank(4, 0) == 4


@pytest.fixture
def restore_threads() -> Iterator[None]:
    """Gives the process back the intra-op threads it had (later tests run with them)."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize('env, changed', [({'LOCAL_WORLD_SIZE': '1'}, False), ({}, False),
                                          ({'LOCAL_WORLD_SIZE': '2', 'OMP_NUM_THREADS': '3'}, False),
                                          ({'LOCAL_WORLD_SIZE': '2'}, True)])
def test_only_several_ranks_without_omp_num_threads_change_anything(monkeypatch: pytest.MonkeyPatch,
                                                                    env: dict[str, str], changed: bool,
                                                                    restore_threads: None) -> None:
    for key in ('LOCAL_WORLD_SIZE', 'OMP_NUM_THREADS'):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(cpu_threads, '_usable_cores', lambda: 16)
    torch.set_num_threads(3)  # neither what was there nor the share
    got = share_cpu_cores()
    if changed:
        assert got == 8 == torch.get_num_threads()
    else:
        assert got is None and torch.get_num_threads() == 3


@pytest.mark.parametrize('command', ['train', 'precompute'])
def test_the_commands_share_the_cores_before_they_start(command: str, monkeypatch: pytest.MonkeyPatch,
                                                        write_config: Callable[..., Path], tiny_assets: Path,
                                                        tmp_path: Path) -> None:
    """``build_trainer`` and ``precompute_teacher`` call it on CPU (stopped right there, before any model loads)."""

    class Called(Exception):
        pass

    def called() -> None:
        raise Called

    if command == 'train':
        from composer_kd.config.run_config import load_config
        from composer_kd.run import train
        monkeypatch.setattr(train, 'share_cpu_cores', called)
        with pytest.raises(Called):
            train.build_trainer(load_config(str(write_config())))
    else:
        from omegaconf import OmegaConf

        from composer_kd.run import precompute
        cfg = OmegaConf.load(Path(__file__).resolve().parents[1] / 'yamls' / 'tiny-cpu-precompute.yaml')
        cfg.variables.assets = str(tiny_assets)
        cfg.precompute.out.local = str(tmp_path / 'topk')
        monkeypatch.setattr(precompute, 'share_cpu_cores', called)
        with pytest.raises(Called):
            precompute.precompute_teacher(OmegaConf.to_container(cfg, resolve=True))


@pytest.mark.launcher
@pytest.mark.skipif(cpu_threads._usable_cores() < 2, reason='one core: every rank gets one thread either way')
def test_ranks_under_the_launcher_split_the_cores(tmp_path: Path) -> None:
    """Composer's launcher says how many ranks share the node (``LOCAL_WORLD_SIZE``): under ``composer -n 2`` each
    rank takes half the cores."""
    script = tmp_path / 'threads.py'
    script.write_text('import os, sys, torch\n'
                      'from composer_kd.run.cpu_threads import share_cpu_cores\n'
                      'share_cpu_cores()\n'
                      'open(sys.argv[1] + os.environ["RANK"], "w").write(str(torch.get_num_threads()))\n')
    env = {k: v for k, v in os.environ.items() if k != 'OMP_NUM_THREADS'}
    command = [sys.executable, '-m', 'composer.cli.launcher', '-n', '2', str(script), str(tmp_path / 'rank')]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    want = str(threads_per_rank(cpu_threads._usable_cores(), 2))
    assert [(tmp_path / f'rank{r}').read_text() for r in (0, 1)] == [want, want]

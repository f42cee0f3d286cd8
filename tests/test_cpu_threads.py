"""Ranks on one CPU node share its cores (``composer_kd/run/cpu_threads.py``)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from composer_kd.run.cpu_threads import share_cpu_cores, threads_per_rank


def test_each_rank_gets_its_share_and_at_least_one_thread() -> None:
    assert threads_per_rank(16, 8) == 2
    assert threads_per_rank(16, 3) == 5
    assert threads_per_rank(2, 2) == 1
    assert threads_per_rank(2, 8) == 1
    assert threads_per_rank(4, 0) == 4


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize('env, changed', [({'LOCAL_WORLD_SIZE': '1'}, False), ({}, False),
                                          ({'LOCAL_WORLD_SIZE': '2', 'OMP_NUM_THREADS': '3'}, False),
                                          ({'LOCAL_WORLD_SIZE': '2'}, True)])
def test_only_several_ranks_without_omp_num_threads_change_anything(monkeypatch: pytest.MonkeyPatch, env: dict,
                                                                    changed: bool, restore_threads: None) -> None:
    for key in ('LOCAL_WORLD_SIZE', 'OMP_NUM_THREADS'):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    torch.set_num_threads(7)
    got = share_cpu_cores()
    if changed:
        assert got == threads_per_rank(len(os.sched_getaffinity(0)), 2) == torch.get_num_threads()
    else:
        assert got is None and torch.get_num_threads() == 7


@pytest.mark.launcher
def test_ranks_under_the_launcher_split_the_cores(tmp_path: Path) -> None:
    """Composer's launcher says how many ranks share the node (``LOCAL_WORLD_SIZE``): under ``composer -n 2`` each
    rank takes half the cores."""
    script = tmp_path / 'threads.py'
    script.write_text('import os, sys, torch\n'
                      'from composer_kd.run.cpu_threads import share_cpu_cores\n'
                      'share_cpu_cores()\n'
                      'open(sys.argv[1] + os.environ["RANK"], "w").write(str(torch.get_num_threads()))\n')
    env = {k: v for k, v in os.environ.items() if k != 'OMP_NUM_THREADS'}
    done = subprocess.run([sys.executable, '-m', 'composer.cli.launcher', '-n', '2', str(script),
                           str(tmp_path / 'rank')], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    want = str(threads_per_rank(len(os.sched_getaffinity(0)), 2))
    assert [(tmp_path / f'rank{r}').read_text() for r in (0, 1)] == [want, want]

"""Eval metrics from 2 processes equal 1 process's on a val set whose size the processes divide evenly."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from reliability import record

pytestmark = pytest.mark.launcher

METRICS = ('LanguageCrossEntropy', 'LanguagePerplexity', 'TeacherDivergenceLoss', 'TeacherTop1Agreement')


def _eval_metrics(tmp_path: Path, tiny_assets: Path, nproc: int) -> dict[str, float]:
    cfg = OmegaConf.load(Path(__file__).resolve().parents[1] / 'yamls' / 'tiny-cpu.yaml')
    cfg.variables.assets = str(tiny_assets)
    log = tmp_path / f'log-{nproc}.txt'
    cfg.update({'save_folder': None, 'eval_first': True, 'max_duration': '1ba', 'eval_interval': '100ba',
                'eval_subset_num_batches': -1, 'device_eval_batch_size': 13, 'log_to_console': False,
                'callbacks': {}, 'loggers': {'file': {'filename': str(log), 'flush_interval': 1}}})
    config = tmp_path / f'config-{nproc}.yaml'
    OmegaConf.save(cfg, config)
    # One process is the plain CLI, as a user runs it (a launcher with one rank is one Python start more).
    launcher = [sys.executable]
    if nproc > 1:
        logs = [str(tmp_path / f'{nproc}-rank{{rank}}.{stream}') for stream in ('out', 'err')]
        launcher += ['-m', 'composer.cli.launcher', '-n', str(nproc), '--stdout', logs[0], '--stderr', logs[1]]
    proc = subprocess.run([*launcher, '-m', 'composer_kd', 'train', str(config)], capture_output=True, text=True,
                          timeout=600, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = log.read_text()
    return {m: float(re.search(rf'\[batch=0\]: metrics/eval/{m}: ([0-9.e+-]+)', text).group(1)) for m in METRICS}


def test_two_process_eval_equals_one_process_eval(tmp_path: Path, tiny_assets: Path) -> None:
    # The tiny val split has 390 samples: 195 per process, no padding; eval batches of 13 leave no partial batch.
    one, two = _eval_metrics(tmp_path, tiny_assets, 1), _eval_metrics(tmp_path, tiny_assets, 2)
    # The file log keeps 4 decimals; perplexity = exp(CE) turns float32 summation-order noise into ~1e-6 relative.
    assert all(abs(one[m] - two[m]) <= 1e-4 * max(1.0, abs(one[m])) for m in METRICS), (one, two)
    record('evaluation on 2 processes vs 1 (val size divisible)', f'the same metrics: {two}', lost='nothing')

"""The GPU smoke suite's one command in ``--dry`` mode on the CPU (issue 19 §2): it imports, runs every case's code
at tiny sizes, computes real numbers where the CPU can, says what needs CUDA, and writes its JSON."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
CASES = ['G1', 'G2', 'G3', 'G4', 'G5']
# What a CPU cannot run; everything else runs for real.
NEEDS_CUDA = {'G3': {'liger'}, 'G4': {'fsdp1', 'fsdp2'}}


def _numbers(value: Any) -> list[float]:
    """Every number in a nested result."""
    if isinstance(value, bool):
        return []
    if isinstance(value, (int, float)):
        return [float(value)]
    if isinstance(value, dict):
        return [n for v in value.values() for n in _numbers(v)]
    if isinstance(value, list):
        return [n for v in value for n in _numbers(v)]
    return []


@pytest.mark.slow
def test_the_dry_run_writes_every_case_with_real_numbers(tmp_path: Path) -> None:
    out = tmp_path / 'gpu_smoke.json'
    run = subprocess.run([sys.executable, str(REPO / 'benchmarks' / 'gpu_smoke.py'), '--dry', '--out', str(out)],
                         capture_output=True, text=True, timeout=300, env={**os.environ, 'CUDA_VISIBLE_DEVICES': ''})
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stderr.splitlines()[0].startswith('gpu_smoke: python ') and 'composer 0.32.1' in run.stderr
    results = json.loads(out.read_text())
    assert results['mode'] == 'dry' and results['finished'] and results['all_passed']
    assert results['environment']['packages']['composer']['version'] == '0.32.1'
    assert list(results['cases']) == CASES
    for name, case in results['cases'].items():
        assert case['status'] == 'passed', (name, case.get('exception'), [c for c in case['checks'] if not c['ok']])
        assert case['time_s'] > 0 and case['peak_bytes'] is None, name  # no CUDA: no CUDA peak
        assert set(case['skipped']) == NEEDS_CUDA.get(name, set()), (name, case['skipped'])
        assert all('needs CUDA' in why or 'CUDA only' in why for why in case['skipped'].values()), case['skipped']
        assert case['checks'] and all(c['ok'] for c in case['checks']), name
        numbers = _numbers(case['result'])
        assert numbers and all(math.isfinite(n) for n in numbers), name
    g2 = results['cases']['G2']['result']
    assert [e['chunk_elements'] for e in g2['fused']] == results['sizes']['chunk_elements']
    assert g2['best_chunk_elements'] in results['sizes']['chunk_elements']
    assert all(e['median_s'] > 0 for e in g2['fused'])
    assert results['cases']['G4']['result']['unwrapped_fp32']['inv_freq_dtypes'] == ['float32']


def test_step_0_stops_with_one_line_when_composer_cannot_be_imported(tmp_path: Path) -> None:
    # A machine whose own torch breaks Composer's import: a module named composer that raises stands in for it.
    fake = tmp_path / 'site'
    (fake / 'composer').mkdir(parents=True)
    (fake / 'composer' / '__init__.py').write_text('raise ImportError("cannot import name \'_foo\' from torch")\n')
    out = tmp_path / 'gpu_smoke.json'
    run = subprocess.run([sys.executable, str(REPO / 'benchmarks' / 'gpu_smoke.py'), '--dry', '--out', str(out)],
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, 'PYTHONPATH': str(fake), 'CUDA_VISIBLE_DEVICES': ''})
    assert run.returncode == 2, run.stderr[-2000:]
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 2 and lines[0].startswith('gpu_smoke: python '), lines  # the versions, then why
    assert lines[1].startswith('gpu_smoke: cannot import Composer (mosaicml 0.32.1) under torch ') and \
        "ImportError: cannot import name '_foo' from torch" in lines[1] and 'docs/gpu.md' in lines[1], lines[1]
    results = json.loads(out.read_text())
    assert results['fatal'] == lines[1].removeprefix('gpu_smoke: ') and 'cases' not in results


def test_a_case_or_part_that_raises_is_recorded_and_the_rest_still_runs(monkeypatch: Any) -> None:
    import torch
    monkeypatch.syspath_prepend(str(REPO / 'tests' / 'gpu'))
    from gpu_common import DRY, Report, attempt, run_case

    def broken(sizes: Any, device: torch.device) -> Report:
        raise RuntimeError('CUDA out of memory. Tried to allocate 2.00 GiB (simulated)')

    def partly_broken(sizes: Any, device: torch.device) -> Report:
        report = Report()
        attempt(report, 'first', lambda: 1 / 0)
        report.at_most('second part', 0.5, 1.0)  # runs after the failed part
        return report

    entry = run_case(broken, DRY, torch.device('cpu'))
    assert entry['status'] == 'error' and entry['time_s'] >= 0
    assert 'Traceback' in entry['exception'] and entry['exception'].strip().endswith('(simulated)')
    entry = run_case(partly_broken, DRY, torch.device('cpu'))
    assert entry['status'] == 'failed'
    assert [c['name'] for c in entry['checks']] == ['first: ran', 'second part']
    assert 'ZeroDivisionError' in entry['result']['first']['exception'] and entry['checks'][1]['ok']

"""The benchmark scripts run end to end (``--quick``) and report what they promise; no timing is asserted."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import shell_environment

pytestmark = pytest.mark.slow  # whole runs: the quickstart, the notebooks, the benchmarks

REPO = Path(__file__).resolve().parents[1]


def test_offline_benchmark_runs_and_reports(fast_quickstart: Path) -> None:
    proc = subprocess.run([sys.executable, str(REPO / 'benchmarks' / 'offline.py'), '--quickstart-out',
                           str(fast_quickstart), '--quick'], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)  # stdout is the JSON alone
    assert set(result['bytes_per_token']) == {f'k{k}/{e}' for k in (8, 32, 128) for e in ('float16', 'uint8')}
    assert result['bytes_per_token']['k32/uint8'] < 100 < result['bytes_per_token']['k32/float16']
    errors = result['kd_error']['relative_to_fp32_topk']
    assert errors and all(abs(e) < 0.01 for e in errors.values())  # both encodings within 1% of exact top-k
    for teacher in result['precompute_throughput'].values():
        assert teacher['teacher_forward_tokens_per_s'] > 0 and teacher['k32/uint8']['over_teacher_forward'] > 0
    assert all(r > 0 for s in result['offline_over_label_only'].values() for r in s['offline_over_label_only'].values())


def test_loss_peers_benchmark_runs_every_installed_case_and_they_agree() -> None:
    import importlib.util
    proc = subprocess.run([sys.executable, str(REPO / 'benchmarks' / 'loss_peers.py'), '--quick'], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    (point,) = result['points']
    cases = {c['case']: c for c in point['cases']}
    expected = {'plain', 'ours_logits', 'ours_fused'} | {
        case for case, module in (('trl', 'trl'), ('torchtune', 'torchtune')) if importlib.util.find_spec(module)}
    assert {name for name, c in cases.items() if 'median_s' in c} == expected
    assert cases['liger']['skipped'] == 'needs CUDA (Triton kernels)'
    assert point['agreement']['agree'] and result['all_agree']
    assert all(c['peak_bytes'] >= 0 and c['kl'] > 0 for c in cases.values() if 'median_s' in c)


def test_on_policy_benchmark_runs_beside_trl_and_splits_the_step(tiny_assets: Path, tmp_path: Path) -> None:
    pytest.importorskip('trl')
    assets = tmp_path / 'assets'  # a copy: Streaming keys its shared memory by the local folder
    shutil.copytree(tiny_assets, assets)
    proc = subprocess.run([sys.executable, str(REPO / 'benchmarks' / 'on_policy.py'), '--assets', str(assets),
                           '--quick'], capture_output=True, text=True, timeout=600, env=shell_environment())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    for side in ('composer_kd', 'trl'):
        summary = result[side]
        assert summary['steps'] == 2 and summary['generated_tokens_per_s'] > 0
        assert abs(sum(summary['split_share'].values()) - 1) < 1e-6
        assert all(summary['split_s_median'][part] > 0 for part in ('generate', 'teacher_forward', 'student_forward'))
    assert result['prompts_retokenized_differently_for_trl'] == 0
    assert result['trl_mixed_precision'] == 'no' and result['trl_student_wrapped_as'] != 'DistributedDataParallel'
    assert len(result['trl_over_composer_kd_step_s']['rounds']) == 2


def test_hidden_states_benchmark_runs_and_reports() -> None:
    proc = subprocess.run([sys.executable, str(REPO / 'benchmarks' / 'hidden_states.py'), '--vocab', '128',
                           '--teacher', '4x64', '--student', '2x32', '--seq', '16', '--batch', '2', '--rounds', '2',
                           '--device', 'cpu'], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    pairs = {'small', 'small_fused', 'cut', 'cut_fused'}
    assert set(result['time_ratio_hidden_over_without']) == pairs
    assert all(r > 0 for r in result['time_ratio_hidden_over_without'].values())
    assert set(result['saved_for_backward_mb']) == pairs | {f'{p}_hidden' for p in pairs}
    assert result['kept_states'] == {'small': {'pairs': 2, 'projections': True, 'mb': 0.0},
                                     'cut': {'pairs': 2, 'projections': False, 'mb': 0.0}}

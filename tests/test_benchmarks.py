"""The benchmark scripts run end to end (``--quick``) and report what they promise; no timing is asserted."""

import json
import subprocess
import sys
from pathlib import Path

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

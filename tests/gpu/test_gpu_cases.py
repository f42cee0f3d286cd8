"""The GPU smoke suite under pytest: each case at GPU sizes on CUDA, every check within its stated bound and no
part skipped. Skipped without CUDA (CI runs the same cases at tiny sizes on the CPU through
``tests/test_gpu_smoke_dry.py``). ``benchmarks/gpu_smoke.py`` runs the same functions once and writes their JSON;
run one or the other, not both, on a machine lent for minutes (``docs/gpu.md``)."""

import pytest
import torch
from gpu_cases import CASES
from gpu_common import GPU

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='the GPU smoke suite needs CUDA')


@pytest.mark.parametrize('name', list(CASES))
def test_gpu_case(name: str) -> None:
    report = CASES[name].fn(GPU, torch.device('cuda'))
    failed = report.failures()
    assert not failed, '\n'.join(f'{c["name"]}: {c.get("value")} (bound {c.get("bound", "yes/no")})' for c in failed)
    assert not report.skipped, report.skipped  # on CUDA every part runs (Liger must be installed)

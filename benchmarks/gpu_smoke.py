"""The GPU smoke suite (issue 19 §2) in one command: cases G1–G5 of ``tests/gpu/``, once each, into one JSON.

    python benchmarks/gpu_smoke.py --out gpu_smoke.json            # a CUDA machine: ≤ 6 minutes on one H200
    python benchmarks/gpu_smoke.py --out /tmp/dry.json --dry       # the same code at tiny sizes on the CPU (CI)
    python benchmarks/gpu_smoke.py --out gpu_smoke.json --cases G2 G3   # some cases only

Step 0 prints the versions it runs under (Python, torch, CUDA and the device, transformers, tokenizers, Composer,
Streaming, Liger, Triton) and stops with one line, exit status 2, if Composer (or another package the suite
needs) cannot be imported there — the first thing to know on a machine whose own torch is not the pinned one
(``docs/gpu.md``). Then each case runs in this process, isolated: an exception becomes that case's
``exception`` (a short traceback) and the next case runs. Each case reports its errors against float32
references, its checks against their stated bounds, its wall time (synchronised) and its peak
``torch.cuda.max_memory_allocated`` (reset at its start). The JSON is rewritten before and after every case, so
a run killed midway leaves the finished cases and names the one that was running.

Exit status: 0 when every case passed (with ``--dry``, the parts that need CUDA are listed under ``skipped``),
1 when a case failed a check, raised or (on CUDA) skipped a part, 2 when step 0 stopped. Timings are reported,
never checked.
"""

import argparse
import dataclasses
import datetime
import importlib
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
BUDGET_S = 360  # the bound for the whole run on one H200-class GPU
# module -> distribution, in the order step 0 prints them
_PACKAGES = {'torch': 'torch', 'transformers': 'transformers', 'tokenizers': 'tokenizers', 'composer': 'mosaicml',
             'streaming': 'mosaicml-streaming', 'liger_kernel': 'liger-kernel', 'triton': 'triton'}
_NEEDED = ('torch', 'transformers', 'tokenizers', 'composer', 'streaming')  # the suite cannot run without these
_NOT_IMPORTED = ('liger_kernel', 'triton')  # read from their metadata: importing Liger starts Triton's driver


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f'{type(error).__name__}: {text[0] if text else ""}'.strip()


def _package(module: str) -> dict[str, Any]:
    """The version of ``module`` this interpreter would use, and where it comes from; or why it cannot."""
    try:
        if module in _NOT_IMPORTED:
            version = importlib.metadata.version(_PACKAGES[module])
            spec = importlib.util.find_spec(module)
            return {'version': version, 'path': None if spec is None else str(Path(spec.origin).parent)}
        imported = importlib.import_module(module)
        version = getattr(imported, '__version__', None) or importlib.metadata.version(_PACKAGES[module])
        return {'version': str(version), 'path': str(Path(imported.__file__).parent)}
    except Exception as e:  # noqa: BLE001 - reported, and step 0 decides
        return {'error': _first_line(e)}


def _git_commit() -> Optional[str]:
    try:
        out = subprocess.run(['git', '-C', str(REPO), 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True,
                             timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment() -> dict[str, Any]:
    """Step 0: what this run runs under."""
    env: dict[str, Any] = {'python': platform.python_version(), 'platform': platform.platform(),
                           'composer_kd_commit': _git_commit(), 'cpus': os.cpu_count()}
    env['packages'] = {module: _package(module) for module in _PACKAGES}
    if 'error' not in env['packages']['torch']:
        import torch
        env['cuda'] = {'available': torch.cuda.is_available(), 'torch_cuda': torch.version.cuda}
        if torch.cuda.is_available():
            properties = torch.cuda.get_device_properties(0)
            env['cuda'].update(device=properties.name, capability=f'{properties.major}.{properties.minor}',
                               memory_gib=round(properties.total_memory / 2**30, 1),
                               devices=torch.cuda.device_count())
    return env


def _one_line(env: dict[str, Any]) -> str:
    parts = [f'python {env["python"]}']
    for module, info in env['packages'].items():
        parts.append(f'{module} {info.get("version", "MISSING")}')
    cuda = env.get('cuda') or {}
    parts.append(f'CUDA {cuda.get("torch_cuda")} on {cuda["device"]} ({cuda["capability"]}, {cuda["memory_gib"]} GiB)'
                 if cuda.get('available') else 'no CUDA device')
    return ', '.join(parts)


def _finite(value: Any) -> Any:
    """The JSON-safe copy of ``value``: NaN and infinities as strings (strict JSON has neither)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _write(path: Path, results: dict[str, Any]) -> None:
    """Replaces ``path`` atomically, so a kill never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f'.{path.name}.tmp')
    tmp.write_text(json.dumps(_finite(results), indent=1))
    os.replace(tmp, path)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')


def _stop(path: Path, results: dict[str, Any], line: str) -> None:
    """Step 0 failed: one line on stderr, the JSON says why, exit status 2."""
    results.update(fatal=line, finished=_now())
    _write(path, results)
    print(f'gpu_smoke: {line}', file=sys.stderr)
    sys.exit(2)


def _summary(name: str, entry: dict[str, Any]) -> str:
    peak = entry.get('peak_bytes')
    line = f'{name} {entry["status"]} in {entry["time_s"]:.1f} s' + (f', peak {peak / 2**30:.2f} GiB' if peak else '')
    failed = [c['name'] for c in entry.get('checks', []) if not c['ok']]
    if failed:
        line += f'; failed: {"; ".join(failed)}'
    if entry.get('skipped'):
        line += f'; skipped: {", ".join(entry["skipped"])}'
    if entry.get('exception'):
        line += f'; {entry["exception"].strip().splitlines()[-1]}'
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--out', required=True, help='the JSON file of results (rewritten after every case)')
    parser.add_argument('--dry', action='store_true', help='tiny sizes on the CPU: imports, shapes and the JSON')
    parser.add_argument('--cases', nargs='+', default=None, help='run only these (default: G1 … G5)')
    args = parser.parse_args()
    path = Path(args.out)
    started = time.perf_counter()
    if args.dry:  # tiny shapes: one thread, so a busy CI machine's OpenMP barriers cannot stall each small op
        os.environ.setdefault('OMP_NUM_THREADS', '1')
    results: dict[str, Any] = {'suite': 'gpu_smoke', 'issue': '19 §2', 'mode': 'dry' if args.dry else 'gpu',
                               'started': _now(), 'finished': None, 'budget_s': BUDGET_S}

    # -- step 0 ----------------------------------------------------------------------------------------------
    env = environment()
    results['environment'] = env
    print(f'gpu_smoke: {_one_line(env)}', file=sys.stderr, flush=True)
    packages = env['packages']
    if 'error' in packages['composer']:
        _stop(path, results, f'cannot import Composer (mosaicml 0.32.1) under torch '
              f'{packages["torch"].get("version", "MISSING")}, Python {env["python"]}: {packages["composer"]["error"]} '
              '— bring the pinned wheels (docs/gpu.md)')
    missing = [f'{m} ({packages[m]["error"]})' for m in _NEEDED if 'error' in packages[m]]
    if missing:
        _stop(path, results, f'cannot import {"; ".join(missing)} — bring the pinned wheels (docs/gpu.md)')
    if not args.dry and not env['cuda']['available']:
        _stop(path, results, 'no CUDA device: run on a GPU machine, or with --dry on a CPU')
    sys.path[:0] = [str(REPO / 'tests' / 'gpu'), str(REPO)]
    try:
        import torch
        from gpu_cases import CASES
        from gpu_common import DRY, GPU, run_case
        if args.dry:
            torch.set_num_threads(int(os.environ['OMP_NUM_THREADS']))
    except Exception as e:  # noqa: BLE001 - the suite's own imports (composer_kd, Composer's modules)
        _stop(path, results, f'cannot import the suite: {_first_line(e)}')

    # -- the cases ---------------------------------------------------------------------------------------------
    warnings.filterwarnings('ignore', category=UserWarning)
    warnings.filterwarnings('ignore', category=DeprecationWarning)
    names = args.cases or list(CASES)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        parser.error(f'unknown cases {unknown}; choose from {list(CASES)}')
    sizes = DRY if args.dry else GPU
    device = torch.device('cpu' if args.dry else 'cuda')
    results['sizes'] = dataclasses.asdict(sizes)
    results['cases'] = {n: {'title': CASES[n].title, 'status': 'pending'} for n in names}
    for name in names:
        results['cases'][name]['status'] = 'running'
        _write(path, results)
        entry = run_case(CASES[name].fn, sizes, device)
        results['cases'][name].update(entry)
        results['total_s'] = round(time.perf_counter() - started, 1)
        _write(path, results)
        print(f'gpu_smoke: {_summary(name, results["cases"][name])}', file=sys.stderr, flush=True)
    results['finished'] = _now()
    results['total_s'] = round(time.perf_counter() - started, 1)
    statuses = [c['status'] for c in results['cases'].values()]
    # On CUDA every part must run; on the CPU the parts that need CUDA are skipped by design.
    results['all_passed'] = all(c['status'] in ('passed', 'skipped') and (args.dry or not c.get('skipped'))
                                for c in results['cases'].values())
    _write(path, results)
    print(json.dumps({'out': str(path), 'total_s': results['total_s'], 'all_passed': results['all_passed'],
                      'statuses': dict(zip(names, statuses))}))
    sys.exit(0 if results['all_passed'] else 1)


if __name__ == '__main__':
    main()

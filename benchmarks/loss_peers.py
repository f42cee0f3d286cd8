"""Our distillation loss beside the peers' on the same inputs: time, peak memory and the value they compute.

Every case takes the same inputs — student and teacher hidden states ``(N, H)``, their heads' weights ``(V, H)``
and labels ``(N,)`` from one seed — and runs forward + backward from the hidden states (the heads' matmuls
included: that is where the ``(N, V)`` tensors are born). The objective is forward KL(teacher ‖ student) at
temperature 1, the per-token mean, with the gradient to the student's hidden states and head weight:

* ``plain``        PyTorch autograd on full logits (``F.kl_div``, what a hand-written loop does);
* ``trl``          TRL's ``GKDTrainer.generalized_jsd_loss`` (beta 0 is forward KL) on full logits;
* ``torchtune``    torchtune's ``ForwardKLWithChunkedOutputLoss`` on logits computed chunk by chunk, as its
                   recipes do; it returns the cross-entropy to the teacher, KL + H(teacher), so its value is
                   compared after subtracting the teacher's entropy (the gradient is the same);
* ``liger``        Liger-Kernel's ``LigerFusedLinearJSD`` (beta 0), CUDA only;
* ``ours_logits``  ``composer_kd.distillation_loss`` (alpha 0) on full logits;
* ``ours_fused``   ``composer_kd.fused_distillation_loss`` (alpha 0) from hidden states and heads.

Each case runs in a fresh process (so one case's allocator state cannot help or hurt another), ``--repeats``
timed runs after one warm-up. Peak memory is the growth over what the inputs hold: on CPU the resident set's
high-water mark (reset after the inputs are built) minus the resident set then; on CUDA ``max_memory_allocated``
minus ``memory_allocated``. After timing, each case reports the loss and the norms of the two gradients, and
the script checks that the cases agree (relative 1e-4 in float32, 2e-2 in bf16) and says so.

    python benchmarks/loss_peers.py                 # the grid: V 32,000 and 128,256; N 2,048 and 8,192
    python benchmarks/loss_peers.py --quick         # tiny sizes, every installed peer, the agreement check

JSON on stdout. Cases whose estimated peak memory would not fit in the memory available are skipped and say so.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

CASES = ('plain', 'trl', 'torchtune', 'liger', 'ours_logits', 'ours_fused')
TORCHTUNE_CHUNKS = 8  # torchtune's default num_output_chunks


def _rss() -> tuple[int, int]:
    """(current, high-water) resident set size in bytes (Linux)."""
    fields = dict(line.split(':', 1) for line in open('/proc/self/status').read().splitlines() if ':' in line)
    return int(fields['VmRSS'].split()[0]) * 1024, int(fields['VmHWM'].split()[0]) * 1024


def _inputs(n: int, h: int, v: int, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The same inputs in every process: logits of a realistic scale (the teacher's entropy ~ 5 nats)."""
    g = torch.Generator().manual_seed(0)

    def make(*shape: int, scale: float) -> torch.Tensor:
        return torch.randn(*shape, generator=g).mul_(scale).to(device=device, dtype=dtype)

    labels = torch.randint(0, v, (n,), generator=g).to(device)
    labels[:n // 16] = -100  # some positions are not scored
    return {
        'student_hidden': make(n, h, scale=1.0).requires_grad_(True),
        'student_weight': make(v, h, scale=h**-0.5).requires_grad_(True),
        'teacher_hidden': make(n, h, scale=1.0),
        'teacher_weight': make(v, h, scale=2 * h**-0.5),
        'labels': labels,
    }


def _loss_fn(case: str) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    """The case's forward from the inputs to a scalar loss (backward is called on it)."""
    if case == 'liger':
        from liger_kernel.transformers import LigerFusedLinearJSD
        liger = LigerFusedLinearJSD(jsd_beta=0.0, temperature=1.0)
        return lambda x: liger(x['student_hidden'], x['student_weight'], x['teacher_hidden'], x['teacher_weight'],
                               x['labels'])
    if case == 'ours_fused':
        from composer_kd.losses.fused import LinearHead, fused_distillation_loss

        def fused(x: dict[str, torch.Tensor]) -> torch.Tensor:
            student = LinearHead(x['student_hidden'][None], x['student_weight'])
            teacher = LinearHead(x['teacher_hidden'][None], x['teacher_weight'])
            return fused_distillation_loss(student, x['labels'][None], teachers=[teacher], alpha=0.0,
                                           shift_labels=False)['total']

        return fused
    if case == 'torchtune':
        from torchtune.modules.loss import ForwardKLWithChunkedOutputLoss
        loss = ForwardKLWithChunkedOutputLoss(num_output_chunks=TORCHTUNE_CHUNKS)

        def chunked(x: dict[str, torch.Tensor]) -> torch.Tensor:
            hidden = x['student_hidden'][None].chunk(TORCHTUNE_CHUNKS, dim=1)
            with torch.no_grad():
                teacher = [F.linear(t, x['teacher_weight']) for t in x['teacher_hidden'][None].chunk(TORCHTUNE_CHUNKS,
                                                                                                     dim=1)]
            return loss([F.linear(s, x['student_weight']) for s in hidden], teacher, x['labels'][None])

        return chunked

    def on_logits(x: dict[str, torch.Tensor]) -> torch.Tensor:
        student = F.linear(x['student_hidden'], x['student_weight'])
        with torch.no_grad():
            teacher = F.linear(x['teacher_hidden'], x['teacher_weight'])
        labels = x['labels']
        if case == 'trl':
            from trl import GKDTrainer
            return GKDTrainer.generalized_jsd_loss(student[None], teacher[None], labels=labels[None], beta=0.0)
        if case == 'ours_logits':
            from composer_kd import distillation_loss
            return distillation_loss(student[None], teacher[None], labels[None], alpha=0.0, shift_labels=False)['total']
        mask = labels != -100  # plain
        log_q, log_p = F.log_softmax(student.float(), dim=-1), F.log_softmax(teacher.float(), dim=-1)
        return F.kl_div(log_q, log_p, log_target=True, reduction='none').sum(dim=-1)[mask].mean()

    return on_logits


def _teacher_entropy(x: dict[str, torch.Tensor]) -> float:
    """Mean entropy of the teacher over the scored rows (chunked, outside the timed region)."""
    mask, total = x['labels'] != -100, 0.0
    with torch.no_grad():
        for rows in mask.nonzero().squeeze(1).split(256):
            log_p = F.log_softmax(F.linear(x['teacher_hidden'][rows], x['teacher_weight']).float(), dim=-1)
            total -= float((log_p.exp() * log_p).sum())
    return total / int(mask.sum())


def run_case(case: str, n: int, h: int, v: int, device: torch.device, dtype: torch.dtype, repeats: int) -> dict:
    """Times one case in this process; returns its figures."""
    x = _inputs(n, h, v, device, dtype)
    fn = _loss_fn(case)

    def sync() -> None:
        if device.type == 'cuda':
            torch.cuda.synchronize()

    times, value = [], 0.0
    for i in range(repeats + 1):
        for t in (x['student_hidden'], x['student_weight']):
            t.grad = None
        if i == 1 or repeats == 0:  # measure memory on a warm run: the allocator's caches are what they will be
            if device.type == 'cuda':
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            else:
                with open('/proc/self/clear_refs', 'w') as f:
                    f.write('5')  # resets the high-water mark to the current resident set
                base = _rss()[0]
        sync()
        start = time.perf_counter()
        loss = fn(x)
        loss.backward()
        sync()
        if i > 0:
            times.append(time.perf_counter() - start)
        value = float(loss)
        if i == 1 or repeats == 0:
            peak = (torch.cuda.max_memory_allocated() if device.type == 'cuda' else _rss()[1]) - base
    grad_h, grad_w = (t.grad.double().norm().item() for t in (x['student_hidden'], x['student_weight']))
    kl = value - _teacher_entropy(x) if case == 'torchtune' else value
    return {'median_s': statistics.median(times) if times else None, 'peak_bytes': int(peak), 'loss': value,
            'kl': kl, 'grad_hidden_norm': grad_h, 'grad_weight_norm': grad_w}


def _estimate_bytes(case: str, n: int, v: int, itemsize: int) -> int:
    """A generous estimate of a case's peak memory, to skip what cannot fit: full-logits cases hold about six
    ``(N, V)`` tensors (float32 upcasts included), torchtune four, ours three, the fused loss none."""
    per = {'plain': 6, 'trl': 8, 'torchtune': 5, 'ours_logits': 3, 'liger': 0, 'ours_fused': 0}[case]
    return per * n * v * max(itemsize, 4)


def _available_bytes(device: torch.device) -> int:
    if device.type == 'cuda':
        free, _ = torch.cuda.mem_get_info()
        return int(free)
    fields = dict(line.split(':', 1) for line in open('/proc/meminfo').read().splitlines())
    return int(fields['MemAvailable'].split()[0]) * 1024


def _installed(case: str, device: torch.device) -> Optional[str]:
    """None if the case can run here, else why not."""
    module = {'trl': 'trl', 'torchtune': 'torchtune', 'liger': 'liger_kernel'}.get(case)
    if case == 'liger' and device.type != 'cuda':
        return 'needs CUDA (Triton kernels)'
    if module is not None:
        import importlib.util
        if importlib.util.find_spec(module) is None:
            return 'not installed (pip install "composer-kd[bench]")'
    return None


def _agreement(results: list[dict], tolerance: float) -> dict[str, Any]:
    """Whether the cases that ran agree on KL and both gradient norms, relative to ``plain`` (else the first)."""
    ran = [r for r in results if 'loss' in r]
    if len(ran) < 2:
        return {'checked': False}
    ref = next((r for r in ran if r['case'] == 'plain'), ran[0])
    worst = {}
    for key in ('kl', 'grad_hidden_norm', 'grad_weight_norm'):
        worst[key] = max(abs(r[key] - ref[key]) / max(abs(ref[key]), 1e-12) for r in ran)
    return {'checked': True, 'reference': ref['case'], 'tolerance': tolerance, 'worst_relative': worst,
            'agree': all(w <= tolerance for w in worst.values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--quick', action='store_true', help='tiny sizes: checks that every case runs and agrees')
    parser.add_argument('--vocab', type=int, nargs='+', default=None)
    parser.add_argument('--tokens', type=int, nargs='+', default=None)
    parser.add_argument('--hidden', type=int, default=None, help='H (default 1,024 on CPU, 4,096 on CUDA)')
    parser.add_argument('--cases', nargs='+', default=list(CASES), choices=CASES)
    parser.add_argument('--repeats', type=int, default=None, help='timed runs per case (default 3; quick 1)')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--one', help=argparse.SUPPRESS)  # internal: run one case in this process
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == 'cuda' else torch.float32
    hidden = args.hidden or (4096 if device.type == 'cuda' else 1024)
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    if args.one:
        result = run_case(args.one, args.tokens[0], hidden, args.vocab[0], device, dtype, repeats)
        print(json.dumps(result))
        return
    vocabs = args.vocab or ([1000] if args.quick else [32000, 128256])
    token_counts = args.tokens or ([64] if args.quick else [2048, 8192])
    hidden = args.hidden or (32 if args.quick else hidden)
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-4
    points = []
    for v in vocabs:
        for n in token_counts:
            results = []
            for case in args.cases:
                entry: dict[str, Any] = {'case': case}
                why = _installed(case, device)
                need = _estimate_bytes(case, n, v, torch.finfo(dtype).bits // 8)
                if why is None and need > 0.8 * _available_bytes(device):
                    why = f'needs ~{need / 2**30:.1f} GiB, {_available_bytes(device) / 2**30:.1f} GiB available'
                if why is not None:
                    entry['skipped'] = why
                else:
                    cmd = [sys.executable, __file__, '--one', case, '--vocab', str(v), '--tokens', str(n), '--hidden',
                           str(hidden), '--repeats', str(repeats), '--device', args.device]
                    proc = subprocess.run(cmd, capture_output=True, text=True,
                                          env=dict(os.environ, PYTHONWARNINGS='ignore'))
                    if proc.returncode != 0:
                        entry['failed'] = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else 'no output'
                    else:
                        entry.update(json.loads(proc.stdout.strip().splitlines()[-1]))
                results.append(entry)
                print(json.dumps({'vocab': v, 'tokens': n, **entry}), file=sys.stderr, flush=True)
            plain = next((r for r in results if r['case'] == 'plain' and 'median_s' in r), None)
            if plain is not None:
                for r in results:
                    if r.get('median_s') and plain['median_s']:
                        r['time_over_plain'] = round(r['median_s'] / plain['median_s'], 3)
                        # At --quick sizes the plain loss can fit in memory the allocator already holds: 0 bytes.
                        r['memory_over_plain'] = (round(r['peak_bytes'] / plain['peak_bytes'], 3)
                                                  if plain['peak_bytes'] else None)
            points.append({'vocab': v, 'tokens': n, 'hidden': hidden, 'cases': results,
                           'agreement': _agreement(results, tolerance)})
    machine = {'platform': platform.platform(), 'processor': platform.processor(), 'cpus': os.cpu_count(),
               'torch': torch.__version__, 'device': args.device, 'dtype': str(dtype).replace('torch.', ''),
               'cuda': torch.cuda.get_device_name() if device.type == 'cuda' else None}
    agree = all(p['agreement'].get('agree', True) for p in points)
    print(json.dumps({'machine': machine, 'repeats': repeats, 'points': points, 'all_agree': agree}, indent=1))
    sys.exit(0 if agree else 1)


if __name__ == '__main__':
    main()

"""What does distillation cost on top of the work it cannot avoid, in time and in memory?

Times, in one process and interleaved round by round, (a) a teacher forward pass under ``no_grad``, (b) a
plain student training step (forward, token cross-entropy through the same loss with ``alpha=1``, backward,
AdamW step) and (c) a full ``DistillationModel`` step (both forwards, the hybrid loss, backward, step), each on
the logits path and with ``fused_head`` (the LM heads applied inside the loss, no ``(B, T, V)`` tensor), and
reports ``kd_step / (teacher_forward + student_step)``. A ratio of 1.00 means the distillation term itself is
free; the target is ≤ 1.05. It also reports each step's peak memory (growth of the resident set's high-water
mark over the step on CPU, ``max_memory_allocated`` on CUDA) and ``kd_step / student_step`` in memory (target
≤ 1.1 with the fused head), and for reference the student step with PyTorch's ``F.cross_entropy`` on the full
logits (what a hand-written loop would do).

    python benchmarks/step_overhead.py                       # the default shape (CPU-sized)
    python benchmarks/step_overhead.py --vocab 128256 --batch 2   # a Llama-3-sized vocabulary

One JSON object on stdout.
"""

import argparse
import json
import platform
import statistics

import torch
import torch.nn.functional as F
from measure import gpt2 as _gpt2
from measure import peak_growth as _peak_growth
from measure import timed as _timed

from composer_kd import DistillationModel, distillation_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--vocab', type=int, default=32000)
    parser.add_argument('--teacher', default='8x512', help='LAYERSxWIDTH of the teacher (default 8x512)')
    parser.add_argument('--student', default='4x256', help='LAYERSxWIDTH of the student (default 4x256)')
    parser.add_argument('--seq', type=int, default=256)
    parser.add_argument('--batch', type=int, default=4)
    parser.add_argument('--rounds', type=int, default=8)
    parser.add_argument('--divergence', default='forward_kl')
    parser.add_argument('--temperature', type=float, default=1.0)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    args = parser.parse_args()
    device = torch.device(args.device)

    (t_layers, t_width), (s_layers, s_width) = (map(int, spec.split('x')) for spec in (args.teacher, args.student))
    teacher = _gpt2(args.vocab, t_layers, t_width, args.seq, seed=1).to(device).eval().requires_grad_(False)
    student = _gpt2(args.vocab, s_layers, s_width, args.seq, seed=2).to(device)
    settings = {'temperature': args.temperature, 'divergence': args.divergence}
    kd = DistillationModel(student, teacher, alpha=0.5, **settings).train()
    kd_fused = DistillationModel(student, teacher, alpha=0.5, fused_head=True, **settings).train()
    labels_fused = DistillationModel(student, None, alpha=1.0, fused_head=True).train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    input_ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)
    batch = {'input_ids': input_ids, 'attention_mask': torch.ones_like(input_ids), 'labels': input_ids.clone()}

    def teacher_forward() -> None:
        with torch.no_grad():
            teacher(input_ids=input_ids, attention_mask=batch['attention_mask'], use_cache=False)

    def update(loss: torch.Tensor) -> None:
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def student_step() -> None:
        logits = student(input_ids=input_ids, attention_mask=batch['attention_mask'], use_cache=False).logits
        update(distillation_loss(logits, None, input_ids, alpha=1.0)['total'])

    def student_step_torch_ce() -> None:
        logits = student(input_ids=input_ids, attention_mask=batch['attention_mask'], use_cache=False).logits
        update(F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten()))

    steps = {
        'teacher_forward': teacher_forward,
        'student_step': student_step,
        'kd_step': lambda: update(kd.loss(kd(batch), batch)['total']),
        'student_step_fused': lambda: update(labels_fused.loss(labels_fused(batch), batch)['total']),
        'kd_step_fused': lambda: update(kd_fused.loss(kd_fused(batch), batch)['total']),
        'student_step_torch_ce': student_step_torch_ce,
    }
    for fn in steps.values():  # warm-up: allocator, kernels, optimizer state
        fn()
    peak = {name: _peak_growth(fn, device) for name, fn in steps.items()}  # warm: optimizer state exists
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, fn in steps.items():
            times[name].append(_timed(fn, device))
    median = {name: statistics.median(values) for name, values in times.items()}
    best = {name: min(values) for name, values in times.items()}  # the least disturbed round of each

    def ratio(table: dict[str, float], kd_name: str, student_name: str) -> float:
        return round(table[kd_name] / (table['teacher_forward'] + table[student_name]), 3)

    where = torch.cuda.get_device_name(device) if device.type == 'cuda' else (
        f'{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads')
    print(json.dumps({
        'machine': {'device': device.type, 'where': where, 'torch': torch.__version__, 'platform': platform.platform()},
        'shape': {'vocab': args.vocab, 'teacher': args.teacher, 'student': args.student, 'batch': args.batch,
                  'seq': args.seq, 'divergence': args.divergence, 'temperature': args.temperature,
                  'rounds': args.rounds},
        'median_ms': {name: round(v * 1e3, 1) for name, v in median.items()},
        'best_ms': {name: round(v * 1e3, 1) for name, v in best.items()},
        'peak_mb': {name: round(v / 2**20, 1) for name, v in peak.items()},
        'time_ratio': {  # kd_step / (teacher_forward + student_step); target <= 1.05
            'logits': ratio(median, 'kd_step', 'student_step'),
            'fused': ratio(median, 'kd_step_fused', 'student_step_fused'),
            'logits_best_rounds': ratio(best, 'kd_step', 'student_step'),
            'fused_best_rounds': ratio(best, 'kd_step_fused', 'student_step_fused'),
        },
        'memory_ratio': {  # kd_step / label-only student_step; target <= 1.1 (fused)
            'logits': round(peak['kd_step'] / max(peak['student_step'], 1), 3),
            'fused': round(peak['kd_step_fused'] / max(peak['student_step_fused'], 1), 3),
            'fused_kd_over_logits_student': round(peak['kd_step_fused'] / max(peak['student_step'], 1), 3),
        },
    }, indent=1))


if __name__ == '__main__':
    main()

"""What does distillation cost on top of the work it cannot avoid?

Times, in one process and interleaved round by round, (a) a teacher forward pass under ``no_grad``, (b) a
plain student training step (forward, token cross-entropy through the same chunked loss with ``alpha=1``,
backward, AdamW step) and (c) a full ``DistillationModel`` step (both forwards, the hybrid loss, backward,
step), and prints ``ratio = kd_step / (teacher_forward + student_step)``. A ratio of 1.00 means the
distillation term itself is free; the target is ≤ 1.05. For reference it also times the student step with
PyTorch's own ``F.cross_entropy`` on the full logits (what a hand-written loop would do).

    python benchmarks/step_overhead.py                       # the default shape (CPU-sized)
    python benchmarks/step_overhead.py --vocab 128256 --seq 256 --batch 1   # a Llama-3-sized vocabulary
"""

import argparse
import platform
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from composer_kd import DistillationModel, distillation_loss


def _gpt2(vocab: int, layers: int, width: int, seq: int, seed: int) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab, n_layer=layers, n_embd=width, n_head=max(1, width // 64), n_positions=seq,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config)


def _timed(fn: Callable[[], None], device: torch.device) -> float:
    if device.type == 'cuda':
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == 'cuda':
        torch.cuda.synchronize()
    return time.perf_counter() - start


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
    model = DistillationModel(student, teacher, alpha=0.5, temperature=args.temperature, divergence=args.divergence)
    model.train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    input_ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)
    batch = {'input_ids': input_ids, 'attention_mask': torch.ones_like(input_ids), 'labels': input_ids.clone()}

    def teacher_forward() -> None:
        with torch.no_grad():
            teacher(input_ids=input_ids, attention_mask=batch['attention_mask'], use_cache=False)

    def student_step() -> None:
        logits = student(input_ids=input_ids, attention_mask=batch['attention_mask'], use_cache=False).logits
        distillation_loss(logits, None, input_ids, alpha=1.0)['total'].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def student_step_torch_ce() -> None:
        logits = student(input_ids=input_ids, attention_mask=batch['attention_mask'], use_cache=False).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def kd_step() -> None:
        losses = model.loss(model(batch), batch)
        losses['total'].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    steps = {
        'teacher_forward': teacher_forward,
        'student_step': student_step,
        'kd_step': kd_step,
        'student_step_torch_ce': student_step_torch_ce,
    }
    for fn in steps.values():  # warm-up: allocator, kernels, optimizer state
        fn()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, fn in steps.items():
            times[name].append(_timed(fn, device))
    median = {name: statistics.median(values) for name, values in times.items()}
    ratio = median['kd_step'] / (median['teacher_forward'] + median['student_step'])
    best = {name: min(values) for name, values in times.items()}  # the least disturbed round of each
    ratio_best = best['kd_step'] / (best['teacher_forward'] + best['student_step'])

    where = torch.cuda.get_device_name(device) if device.type == 'cuda' else (
        f'{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads')
    print(f'device: {device.type} ({where}); torch {torch.__version__}')
    print(f'shape: vocab {args.vocab}, teacher {args.teacher}, student {args.student}, batch {args.batch} x seq '
          f'{args.seq}; divergence {args.divergence}, T={args.temperature}; median of {args.rounds} rounds')
    print(f'{"":>22}  {"median":>9}    {"best":>9}')
    for name in steps:
        print(f'{name:>22}: {median[name] * 1e3:9.1f} ms {best[name] * 1e3:9.1f} ms')
    print(f'ratio kd_step / (teacher_forward + student_step) = {ratio:.3f} (medians), {ratio_best:.3f} (best rounds); '
          'target <= 1.05')


if __name__ == '__main__':
    main()

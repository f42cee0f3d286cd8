"""What does the hidden-state term (``model.distillation.hidden_states``) cost, in step time and in memory?

Times, in one process and interleaved round by round, a full ``DistillationModel`` training step (both forwards,
the loss, backward, AdamW step) without and with the hidden-state term, for two students of one teacher:

* ``small``: a narrower, shallower student (``--student``): every student block is paired with a teacher block
  (``uniform``) through a trainable projection to the teacher's width;
* ``cut``: the teacher's own architecture with every other block (``cut_model``): equal widths, no projection,
  each block paired with the block it was copied from;

each on the logits path and with ``fused_head``. Each round runs every pair's two steps back to back (who goes first
alternating), so both see the same machine; reports the median and best-round step times and, per pair, the median
over rounds of the round's ``with / without`` ratio (what a busy machine cannot move much); the bytes autograd saves for backward in each step's forward (every distinct storage a saved tensor holds,
weights included: the same on every machine and under any load); each step's peak memory (growth of the resident set's
high-water mark over the step on CPU — allocator-dependent and noisy —, ``max_memory_allocated`` on CUDA); and, for
scale, the bytes of the states the term keeps (P pairs of teacher and projected student states, float32). No timing
is asserted anywhere.

    python benchmarks/hidden_states.py --threads 1 --rounds 6   # docs/pruned-students.md (the default shape, CPU-sized)
    python benchmarks/hidden_states.py --loss normalized_mse --rounds 12

One JSON object on stdout.
"""

import argparse
import json
import platform
import statistics
from typing import Callable

import torch
from measure import gpt2 as _gpt2
from measure import peak_growth as _peak_growth
from measure import timed as _timed

from composer_kd import DistillationModel
from composer_kd.model.hidden_state_taps import HiddenStateDistillation
from composer_kd.model.layer_pruning import cut_model


def _saved_for_backward(forward: Callable[[], torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd saves for backward during ``forward()`` (then backpropagated)."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = forward()
    loss.backward()
    return sum(storages.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--vocab', type=int, default=32000)
    parser.add_argument('--teacher', default='8x512', help='LAYERSxWIDTH of the teacher (default 8x512)')
    parser.add_argument('--student', default='4x256', help='LAYERSxWIDTH of the small student (default 4x256)')
    parser.add_argument('--seq', type=int, default=128)
    parser.add_argument('--batch', type=int, default=4)
    parser.add_argument('--rounds', type=int, default=8)
    parser.add_argument('--loss', default='cosine', choices=['cosine', 'mse', 'normalized_mse'])
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--threads', type=int, default=None, help="torch threads on CPU (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    (t_layers, t_width), (s_layers, s_width) = (map(int, spec.split('x')) for spec in (args.teacher, args.student))
    teacher = _gpt2(args.vocab, t_layers, t_width, args.seq, seed=1).to(device).eval().requires_grad_(False)
    students = {'small': _gpt2(args.vocab, s_layers, s_width, args.seq, seed=2).to(device),
                'cut': cut_model(teacher, list(range(1, t_layers, 2))).to(device).requires_grad_(True)}
    input_ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)
    batch = {'input_ids': input_ids, 'attention_mask': torch.ones_like(input_ids), 'labels': input_ids.clone()}

    steps: dict[str, Callable[[], None]] = {}
    forwards: dict[str, Callable[[], torch.Tensor]] = {}
    kept_bytes = {}
    for kind, student in students.items():
        for fused in (False, True):
            for hidden in (False, True):
                taps = HiddenStateDistillation(student, teacher, loss=args.loss).to(device) if hidden else None
                model = DistillationModel(student, teacher, alpha=0.5, fused_head=fused, hidden_states=taps).train()
                optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

                def forward(model: DistillationModel = model) -> torch.Tensor:
                    return model.loss(model(batch), batch)['total']

                def step(forward: Callable[[], torch.Tensor] = forward,
                         optimizer: torch.optim.Optimizer = optimizer) -> None:
                    forward().backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)

                name = f'{kind}{"_fused" if fused else ""}{"_hidden" if hidden else ""}'
                steps[name], forwards[name] = step, forward
                if taps is not None and not fused:
                    kept_bytes[kind] = {'pairs': len(taps.pairs), 'projections': taps.projections is not None,
                                        'mb': round(2 * len(taps.pairs) * args.batch * args.seq * t_width * 4 / 2**20,
                                                    1)}
    for fn in steps.values():  # warm-up: allocator, kernels, optimizer state
        fn()
    peak = {name: _peak_growth(fn, device) for name, fn in steps.items()}
    saved = {name: _saved_for_backward(fn) for name, fn in forwards.items()}
    for model_step in steps.values():  # a step each (its zero_grad drops the saved-bytes pass's gradients)
        model_step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    pairs = [name for name in steps if not name.endswith('_hidden')]
    round_ratios: dict[str, list[float]] = {name: [] for name in pairs}
    for r in range(args.rounds):
        # each pair back to back, who goes first alternating: both see the same machine
        for name in pairs[r % len(pairs):] + pairs[:r % len(pairs)]:
            order = [name, f'{name}_hidden'] if r % 2 == 0 else [f'{name}_hidden', name]
            for which in order:
                times[which].append(_timed(steps[which], device))
            round_ratios[name].append(times[f'{name}_hidden'][-1] / times[name][-1])
    median = {name: statistics.median(values) for name, values in times.items()}
    best = {name: min(values) for name, values in times.items()}  # the least disturbed round of each
    where = torch.cuda.get_device_name(device) if device.type == 'cuda' else (
        f'{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads')
    print(json.dumps({
        'machine': {'device': device.type, 'where': where, 'torch': torch.__version__, 'platform': platform.platform()},
        'shape': {'vocab': args.vocab, 'teacher': args.teacher, 'small_student': args.student,
                  'cut_student': f'{len(students["cut"].transformer.h)}x{t_width}', 'batch': args.batch,
                  'seq': args.seq, 'loss': args.loss, 'rounds': args.rounds},
        'median_ms': {name: round(v * 1e3, 1) for name, v in median.items()},
        'best_ms': {name: round(v * 1e3, 1) for name, v in best.items()},
        # the comparison load cannot move much: the median over rounds of each round's paired ratio
        'time_ratio_hidden_over_without': {name: round(statistics.median(v), 3) for name, v in round_ratios.items()},
        'time_ratio_of_medians': {name: round(median[f'{name}_hidden'] / median[name], 3) for name in pairs},
        'time_ratio_best_rounds': {name: round(best[f'{name}_hidden'] / best[name], 3) for name in pairs},
        # each step's time against its own median: how far the machine's load moved the rounds
        'spread': {name: round((max(v) - min(v)) / median[name], 3) for name, v in times.items()},
        'saved_for_backward_mb': {name: round(v / 2**20, 1) for name, v in saved.items()},
        'saved_mb_hidden_minus_without': {name: round((saved[f'{name}_hidden'] - saved[name]) / 2**20, 1)
                                          for name in pairs},
        'peak_mb': {name: round(v / 2**20, 1) for name, v in peak.items()},
        'peak_mb_hidden_minus_without': {name: round((peak[f'{name}_hidden'] - peak[name]) / 2**20, 1)
                                         for name in pairs},
        'kept_states': kept_bytes,
    }, indent=1))


if __name__ == '__main__':
    main()

"""What the offline (precomputed top-k) teacher costs and how close it is to the dense one, in one run.

On the quickstart's artifacts (run ``composer-kd quickstart`` first, or ``--fast``), prints one JSON object:

* ``bytes_per_token``: of the precomputed dataset at k ∈ {8, 32, 128}, float16 and uint8 (everything in the
  shards: tokens, ids, log-probs, rest mass, MDS framing);
* ``kd_error``: the KD term (forward KL, mean per token) of the quickstart's label-only student against the
  teacher, dense vs top-k, on held-out batches: top-k with exact float32 values, then through each encoding
  (the real encode/decode path); at T = 1 and at T = 2 (with the recorded rest mass at T);
* ``precompute_throughput``: tokens/s of the precompute loop against the teacher's forward alone, same
  batches, interleaved (target ≥ 0.9), for the quickstart's teacher and a larger one;
* ``offline_over_label_only``: training tokens/s of offline distillation ÷ label-only training of the same
  student, by the paired interleaved step measurement (``run/step_costs.py``), for the quickstart student
  and a larger one (target ≥ 0.95).

    python benchmarks/offline.py --quickstart-out quickstart-out
    python benchmarks/offline.py --quickstart-out quickstart-out-fast --quick      # a minute, for CI
"""

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from streaming import MDSWriter, StreamingDataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from composer_kd import distillation_loss, topk_distillation_loss
from composer_kd.data import build_token_dataloader
from composer_kd.data.teacher_topk import decode_teacher, encode_sample, pad_teacher, topk_teacher_from_batch
from composer_kd.model.teacher_topk_model import topk_logprobs
from composer_kd.quickstart.tiny_assets import save_gpt2
from composer_kd.config.precompute_config import load_precompute_config
from composer_kd.config.run_config import load_config
from composer_kd.run.precompute import precompute_teacher
from composer_kd.quickstart.step_costs import paired_step_costs, training_step
from composer_kd.run.train import build_trainer

REPO = Path(__file__).resolve().parents[1]
KS = (8, 32, 128)
ENCODINGS = ('float16', 'uint8')


def _subset(out: Path, split: str, samples: int, folder: Path) -> Path:
    """The first ``samples`` samples of the quickstart's ``split`` as a plain token dataset."""
    source = StreamingDataset(local=str(out / 'data' / 'mds'), split=split, shuffle=False, batch_size=1)
    with MDSWriter(columns={'tokens': 'ndarray:int32'}, out=str(folder / split)) as writer:
        for i in range(min(samples, source.num_samples)):
            writer.write({'tokens': np.asarray(source[i]['tokens'], dtype=np.int32)})
    return folder


def _precompute(out: Path, data: Path, target: Path, k: int, encoding: str, max_seq_len: int, batch: int,
                teacher: Path | None = None) -> dict[str, Any]:
    overrides = [f'variables.out={out}', f'variables.max_seq_len={max_seq_len}', f'variables.top_k={k}',
                 f'variables.teacher={teacher or out / "teacher" / "model"}',
                 f'variables.logprobs={encoding}', f'variables.topk_out={target}',
                 f'precompute.dataset.local={data}', f'precompute.device_batch_size={batch}',
                 f'precompute.samples_per_part={batch * 1000}', 'precompute.progress_bar=false']
    return precompute_teacher(load_precompute_config(str(REPO / 'yamls' / 'quickstart' / 'teacher_topk.yaml'),
                                                     overrides))


def _teacher_forward_s(teacher: torch.nn.Module, data: Path, max_seq_len: int, batch: int) -> tuple[float, int]:
    """Seconds and tokens of the teacher's forward alone over ``data``, in the precompute's batches."""
    loader = build_token_dataloader({'local': str(data), 'split': 'train', 'max_seq_len': max_seq_len}, batch, 0,
                                    drop_last=False).dataloader
    batches = list(loader)
    start = time.perf_counter()
    with torch.no_grad():
        for b in batches:
            teacher(input_ids=b['input_ids'], attention_mask=b['attention_mask'], use_cache=False)
    return time.perf_counter() - start, sum(int(b['attention_mask'].sum()) for b in batches)


def _encoded_teacher(ids: torch.Tensor, logprobs: torch.Tensor, rest: torch.Tensor, temperatures: list[float],
                     encoding: str, vocab: int, temperature: float) -> Any:
    """A batch's top-k through MDS encoding and the loader's decoding, as the loss receives it."""
    samples = []
    for row in range(ids.shape[0]):
        rests = {t: rest[row, :, m].numpy() for m, t in enumerate(temperatures)}
        sample = encode_sample(np.zeros(ids.shape[1], np.int64), row, ids[row].numpy(), logprobs[row].numpy(), rests,
                               vocab, encoding)
        samples.append(decode_teacher(sample, ids.shape[1], temperature))
    return topk_teacher_from_batch(pad_teacher(samples, ids.shape[1]))


def kd_errors(out: Path, max_seq_len: int, batches: int) -> dict[str, Any]:
    """Mean-per-token forward KL of the label-only student to the teacher: dense vs every top-k variant."""
    teacher = AutoModelForCausalLM.from_pretrained(out / 'teacher' / 'model').eval()
    student = AutoModelForCausalLM.from_pretrained(out / 'baseline' / 'model').eval()
    vocab = len(AutoTokenizer.from_pretrained(out / 'tokenizer' / 'tokenizer'))
    loader = build_token_dataloader({'local': str(out / 'data' / 'mds'), 'split': 'val', 'max_seq_len': max_seq_len},
                                    16, 0, drop_last=True).dataloader
    sums: dict[str, float] = {}
    count = 0
    for b, batch in enumerate(loader):
        if b == batches:
            break
        with torch.no_grad():
            t_logits = teacher(input_ids=batch['input_ids']).logits[..., :vocab]
            s_logits = student(input_ids=batch['input_ids']).logits[..., :vocab]
        labels = batch['labels']
        n = int((labels[:, 1:] != -100).sum())
        count += n

        def add(name: str, value: torch.Tensor) -> None:
            sums[name] = sums.get(name, 0.0) + float(value) * n

        for temperature in (1.0, 2.0):
            tag = f'T{temperature:g}'
            add(f'{tag}/dense', distillation_loss(s_logits, t_logits, labels, alpha=0.0, temperature=temperature)['kd'])
            B, T, V = t_logits.shape
            for k in KS:
                ids, lp, rest = topk_logprobs(t_logits.reshape(B * T, V), k, [1.0, temperature])
                ids, lp, rest = ids.view(B, T, k), lp.view(B, T, k), rest.view(B, T, 2)
                exact = rest[..., 1 if temperature != 1.0 else 0]
                add(f'{tag}/k{k}/fp32', topk_distillation_loss(
                    s_logits, ids, lp, labels, alpha=0.0, temperature=temperature, teacher_rest_logprob=exact)['kd'])
                for encoding in ENCODINGS:
                    enc = _encoded_teacher(ids, lp, rest, [1.0, temperature], encoding, vocab, temperature)
                    add(f'{tag}/k{k}/{encoding}', topk_distillation_loss(
                        s_logits, enc.ids, enc.logprobs, labels, alpha=0.0, temperature=temperature,
                        teacher_rest_logprob=enc.rest_logprob)['kd'])
    means = {name: total / count for name, total in sums.items()}
    errors: dict[str, Any] = {'tokens': count, 'kd_mean': means, 'relative_to_dense': {}, 'relative_to_fp32_topk': {}}
    for name, value in means.items():
        tag, _, variant = name.partition('/')
        if variant == 'dense':
            continue
        errors['relative_to_dense'][name] = value / means[f'{tag}/dense'] - 1
        k_name = variant.split('/')[0]
        if not variant.endswith('fp32'):
            errors['relative_to_fp32_topk'][name] = value / means[f'{tag}/{k_name}/fp32'] - 1
    return errors


def _student_trainer(out: Path, vocab: int, model: str, data: Path | None, max_seq_len: int) -> Any:
    layers, width = map(int, model.split('x'))
    overrides = [f'variables.out={out}', f'variables.vocab_size={vocab}', f'variables.max_seq_len={max_seq_len}',
                 f'variables.n_layer={layers}', f'variables.n_embd={width}', f'variables.n_head={max(1, width // 64)}',
                 'eval_loader=null', 'variables.save_folder=null', 'loggers=null', 'progress_bar=false']
    if data is None:
        overrides += ['model.teacher=null', 'variables.alpha=1.0']
    else:
        overrides += ['model.teacher.precomputed=true', f'train_loader.dataset.local={data}']
    return build_trainer(load_config(str(REPO / 'yamls' / 'quickstart' / 'student.yaml'), overrides))


def main() -> None:
    # Only the JSON goes to stdout: the commands' own progress lines go to stderr.
    with contextlib.redirect_stdout(sys.stderr):
        result = _measure()
    print(json.dumps(result, indent=1))


def _measure() -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--quickstart-out', default='quickstart-out', help='a finished quickstart folder')
    parser.add_argument('--samples', type=int, default=1024, help='train samples precomputed per setting')
    parser.add_argument('--kd-batches', type=int, default=16, help='held-out batches of 16 for the KD errors')
    parser.add_argument('--rounds', type=int, default=30, help='paired rounds of the step measurement')
    parser.add_argument('--students', default='1x96,4x256', help='LAYERSxWIDTH students for the step ratio')
    parser.add_argument('--larger-teachers', default='8x512', help='LAYERSxWIDTH teachers (random) also timed '
                        'for the precompute throughput')
    parser.add_argument('--quick', action='store_true', help='tiny sizes: checks the script end to end')
    args = parser.parse_args()
    if args.quick:
        args.samples, args.kd_batches, args.rounds, args.students, args.larger_teachers = 64, 2, 3, '1x32', '1x64'
    out = Path(args.quickstart_out).resolve()
    if not (out / 'results.json').is_file():
        raise SystemExit(f'{out} is not a finished quickstart folder: run `composer-kd quickstart --out {out}` first')
    settings = json.loads((out / 'settings.json').read_text())
    max_seq_len = settings['max_seq_len']
    vocab = json.loads((out / 'tokenizer' / 'done.json').read_text())['vocab_size']
    result: dict[str, Any] = {
        'machine': f'{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}',
        'quickstart_out': str(out), 'samples': args.samples,
    }
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        data = _subset(out, 'train', args.samples, tmp / 'data')
        bytes_per_token, summaries = {}, {}
        for k in KS:
            for encoding in ENCODINGS:
                summary = _precompute(out, data, tmp / f'k{k}-{encoding}', k, encoding, max_seq_len, 64)
                bytes_per_token[f'k{k}/{encoding}'] = summary['bytes_per_token']
                summaries[(k, encoding)] = summary
        result['bytes_per_token'] = bytes_per_token

        # The precompute loop against the teacher's forward alone, interleaved: forward, k=32, k=128, forward, ...
        # for the quickstart's teacher and for a larger one (random weights: the cost does not depend on them).
        teachers = {'quickstart teacher 3x192': out / 'teacher' / 'model'}
        for spec in filter(None, args.larger_teachers.split(',')):
            layers, width = map(int, spec.split('x'))
            folder = tmp / f'teacher-{spec}'
            save_gpt2(str(folder), vocab, layers, width, max(1, width // 64), max_seq_len, seed=0)
            teachers[f'random teacher {spec}'] = folder
        result['precompute_throughput'] = {}
        for name, folder in teachers.items():
            teacher = AutoModelForCausalLM.from_pretrained(folder).eval()
            forward, loops = [], {32: [], 128: []}
            for repeat in range(2):
                forward.append(_teacher_forward_s(teacher, data, max_seq_len, 64))
                for k in loops:
                    summary = _precompute(out, data, tmp / f'again-{name[-5:]}-{k}-{repeat}', k, 'uint8', max_seq_len,
                                          64, teacher=folder)
                    loops[k].append((summary['loop_s'], summary['tokens']))
            forward_tps = statistics.median(tokens / s for s, tokens in forward)
            result['precompute_throughput'][name] = {
                'teacher_forward_tokens_per_s': forward_tps,
                **{f'k{k}/uint8': {'tokens_per_s': statistics.median(t / s for s, t in v),
                                   'over_teacher_forward': statistics.median(t / s for s, t in v) / forward_tps}
                   for k, v in loops.items()},
            }
        result['kd_error'] = kd_errors(out, max_seq_len, args.kd_batches)

        ratios = {}
        for model in args.students.split(','):
            trainers = {'labels_only': _student_trainer(out, vocab, model, None, max_seq_len)}
            for k in (32, 128):
                trainers[f'offline_k{k}'] = _student_trainer(out, vocab, model, tmp / f'k{k}-uint8', max_seq_len)
            costs = paired_step_costs({n: training_step(t) for n, t in trainers.items()}, rounds=args.rounds,
                                      warmup=max(1, args.rounds // 6))
            ratios[f'student {model}'] = {
                'step_s': costs['step_s'],
                'offline_over_label_only': {n: 1 / r for n, r in costs['ratio'].items() if n != 'labels_only'},
            }
            for trainer in trainers.values():
                trainer.close()
        result['offline_over_label_only'] = ratios
    return result


if __name__ == '__main__':
    main()

"""Does a student cut from the teacher, and distillation through hidden states, pay on CPU? The evidence table of
``docs/pruned-students.md``: SmolLM2-135M-Instruct (``make-example-teacher``, 30 blocks) and a student of 9 of its
blocks (``every: 4, keep_first, keep_last``: 0, 3, 7, …, 27, 29), trained four ways at equal compute:

* ``random_kd``: the student's architecture from random weights, logit KD (alpha 0.1, forward KL, T 1);
* ``cut_kd``: cut from the teacher (``model.student.from_teacher``), logit KD — the reference of the budget;
* ``cut_kd_hidden``: cut, logit KD + hidden-state KD (``model.distillation.hidden_states``: each block against the
  teacher block it was copied from, cosine, weight 1);
* ``cut_labels``: cut, labels alone (no teacher in the step: more steps for the same compute).

"Equal compute" is the quickstart's paired step-cost measurement (``step_costs``: one step of each kind
interleaved round after round in one process, the median per-round ratio to a ``cut_kd`` step), so a busy machine
cannot skew it: each run gets ``--steps`` × (cost of a ``cut_kd`` step) / (cost of its own step) steps.
``random_kd`` has ``cut_kd``'s shapes and teacher, so its steps cost the same; ``cut_kd_hidden`` does a ``cut_kd``
step and more, so a measured ratio below 1 (load noise) is taken as 1 (``ratio_used``).

Every run goes through the public path (``train`` with a run config, then ``export``) on the same data, seed and
schedule shape; then ``composer-kd eval`` of the students (and of the cut student before training, and the teacher)
against the teacher on the held-out split: CE and top-1 agreement. Prints one JSON object; each stage is kept under
``OUT`` and a rerun skips finished stages.

    python benchmarks/pruned_students.py --teacher smollm2-135m --heldout smollm2-data --train smollm2-train \\
        --out pruned-out --threads 1 --steps 40 --seq-len 64      # docs/pruned-students.md (data at 64 tokens)
"""

import argparse
import contextlib
import datetime
import io
import json
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from composer_kd.cli import main as cli
from composer_kd.quickstart.step_costs import paired_step_costs, training_step
from composer_kd.run.export import export_student
from composer_kd.run.prune import prune_model
from composer_kd.run.train import build_trainer, train

CUT = {'every': 4, 'keep_first': True, 'keep_last': True}
# name: (student, teacher in the step, alpha, hidden-state KD, learning rate)
RUNS: dict[str, tuple[str, bool, float, bool, float]] = {
    'random_kd': ('random', True, 0.1, False, 1e-3),
    'cut_kd': ('cut', True, 0.1, False, 3e-4),
    'cut_kd_hidden': ('cut', True, 0.1, True, 3e-4),
    'cut_labels': ('cut', False, 1.0, False, 3e-4),
}


def _config(args: argparse.Namespace, name: str, steps: int) -> dict[str, Any]:
    """The run config of one arm (no eval during training: ``composer-kd eval`` runs once at the end)."""
    student_kind, with_teacher, alpha, hidden, lr = RUNS[name]
    if student_kind == 'random':  # the cut student's architecture (its saved config), fresh weights
        student = {'pretrained_model_name_or_path': str(args.out / 'cut'), 'pretrained': False}
    elif with_teacher:
        student = {'from_teacher': dict(CUT)}
    else:  # no teacher in the run to cut: the same student, written once by `composer-kd prune`
        student = {'pretrained_model_name_or_path': str(args.out / 'cut')}
    distillation: dict[str, Any] = {'alpha': alpha, 'temperature': 1.0, 'divergence': 'forward_kl'}
    if hidden:
        distillation['hidden_states'] = {'pairs': 'uniform', 'loss': 'cosine', 'weight': 1.0}
    model: dict[str, Any] = {'student': student, 'distillation': distillation}
    if with_teacher:
        model['teacher'] = {'pretrained_model_name_or_path': str(args.teacher)}
    return {
        'run_name': name, 'seed': 17, 'max_seq_len': args.seq_len, 'model': model,
        'tokenizer': {'name': str(args.teacher)},
        'train_loader': {'dataset': {'local': str(args.train), 'split': 'train', 'shuffle': True, 'shuffle_seed': 17},
                         'drop_last': True, 'num_workers': 0},
        'optimizer': {'name': 'decoupled_adamw', 'lr': lr, 'betas': [0.9, 0.95], 'eps': 1e-8, 'weight_decay': 0.0},
        'scheduler': {'name': 'cosine_with_warmup', 't_warmup': f'{max(1, steps // 10)}ba', 'alpha_f': 0.1},
        'algorithms': {'gradient_clipping': {'clipping_type': 'norm', 'clipping_threshold': 1.0}},
        'max_duration': f'{steps}ba', 'global_train_batch_size': args.batch, 'precision': 'fp32',
        'save_folder': str(args.out / name / 'checkpoints'), 'save_interval': f'{steps}ba',
        'save_num_checkpoints_to_keep': 1, 'save_overwrite': True, 'progress_bar': False, 'log_to_console': False,
    }


def make_cut(args: argparse.Namespace) -> dict[str, Any]:
    """The cut student as a folder (``composer-kd prune``): the labels-only run's start and the random run's shape."""
    return prune_model(str(args.teacher), str(args.out / 'cut'), overwrite=True, **CUT)


def step_costs(args: argparse.Namespace) -> dict[str, Any]:
    """One step of each kind, interleaved (``paired_step_costs``); the first is the reference."""
    names = ['cut_kd', 'cut_kd_hidden', 'cut_labels']
    trainers = {n: build_trainer({**_config(args, n, 10**6), 'save_folder': None}) for n in names}
    costs = paired_step_costs({n: training_step(t) for n, t in trainers.items()}, rounds=args.cost_rounds,
                              warmup=max(1, args.cost_rounds // 6))
    for trainer in trainers.values():
        trainer.close()
    return {**costs, 'threads': torch.get_num_threads()}


def _train(args: argparse.Namespace, name: str, steps: int) -> dict[str, Any]:
    folder = args.out / name
    start = time.perf_counter()
    trainer = train(_config(args, name, steps))
    wall = time.perf_counter() - start
    done = int(trainer.state.timestamp.batch)
    trainer.close()
    export_student(str(folder / 'checkpoints' / 'latest-rank0.pt'), str(folder / 'model'), overwrite=True)
    shutil.rmtree(folder / 'checkpoints')
    return {'steps': done, 'wall_s': wall, 'config': _config(args, name, steps)}


def evaluate(args: argparse.Namespace, names: list[str]) -> dict[str, Any]:
    """``composer-kd eval`` of the teacher, the cut student untrained and the trained students, on the held-out
    split, against the teacher (loaded once)."""
    folders = {'teacher': str(args.teacher), 'cut_untrained': str(args.out / 'cut'),
               **{n: str(args.out / n / 'model') for n in names}}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        status = cli(['eval', '--models', *folders.values(), '--data', str(args.heldout), '--max-seq-len',
                      str(args.seq_len), '--teacher', str(args.teacher), '--batch-size', '8', '--max-samples',
                      str(args.eval_samples)])
    assert status == 0, 'composer-kd eval failed'
    results = json.loads(printed.getvalue())
    return {name: results[folder] for name, folder in folders.items()}


def _stage(path: Path, make: Any) -> dict[str, Any]:
    if path.is_file():
        return json.loads(path.read_text())
    print(f'[{path.stem}] ...', flush=True)
    record = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1))
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--teacher', type=Path, required=True, help='make-example-teacher output')
    parser.add_argument('--heldout', type=Path, required=True, help='prepare-data output whose val split is held out')
    parser.add_argument('--train', type=Path, required=True, help='prepare-data output of the training documents')
    parser.add_argument('--out', type=Path, default=Path('pruned-out'))
    parser.add_argument('--steps', type=int, default=30, help='steps of cut_kd, the budget (default 30)')
    parser.add_argument('--batch', type=int, default=4, help='sequences per step (default 4)')
    parser.add_argument('--seq-len', type=int, default=64, help='tokens per sequence (default 64; the data prepared '
                        'with --max-seq-len of at least that)')
    parser.add_argument('--cost-rounds', type=int, default=8, help='measured rounds of the step costs (default 8)')
    parser.add_argument('--threads', type=int, default=None, help='torch threads (default: torch\'s). On cores other '
                        'jobs share, 1: 2 threads that wait for each other at every op measure (and spend) the waits')
    parser.add_argument('--eval-samples', type=int, default=64, help='held-out sequences evaluated (default 64)')
    parser.add_argument('--runs', nargs='+', default=list(RUNS), choices=list(RUNS))
    parser.add_argument('--costs-only', action='store_true', help='stop after measuring the step costs')
    parser.add_argument('--train-only', action='store_true', help='stop after training --runs (to train arms side '
                        'by side in several processes; a last call without it evaluates them all)')
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    records: dict[str, Any] = {'machine': f'{platform.processor() or platform.machine()}, '
                                          f'{torch.get_num_threads()} threads',
                               'date': datetime.date.today().isoformat(), 'torch': torch.__version__,
                               'budget': {'cut_kd_steps': args.steps, 'batch': args.batch, 'seq_len': args.seq_len}}
    records['cut'] = _stage(args.out / 'cut.json', lambda: make_cut(args))
    records['step_costs'] = _stage(args.out / f'step_costs-{torch.get_num_threads()}-threads.json',
                                   lambda: step_costs(args))
    if args.costs_only:
        print(json.dumps(records, indent=1))
        return
    ratio = {**records['step_costs']['ratio'], 'random_kd': 1.0}  # random_kd: cut_kd's shapes and teacher
    # cut_kd_hidden's step is cut_kd's plus the term: it cannot cost less, and a measured ratio below 1 is the load
    # of a shared machine (benchmarks/hidden_states.py: no cost above the noise); it gets at most cut_kd's steps.
    ratio['cut_kd_hidden'] = max(1.0, ratio['cut_kd_hidden'])
    records['ratio_used'] = ratio
    records['runs'] = {}
    for name in args.runs:
        steps = max(1, round(args.steps / ratio[name]))
        records['runs'][name] = _stage(args.out / 'runs' / f'{name}-{steps}-b{args.batch}.json',
                                      lambda n=name, s=steps: _train(args, n, s))
    if args.train_only:
        print(json.dumps(records, indent=1))
        return
    names = [n for n in RUNS if n in args.runs]
    records['eval'] = _stage(args.out / f'eval-{"-".join(names)}-{args.steps}-{args.eval_samples}.json',
                             lambda: evaluate(args, names))
    print(json.dumps(records, indent=1))


if __name__ == '__main__':
    main()

"""When does distilling a real pretrained teacher pay on CPU? SmolLM2-135M-Instruct (``make-example-teacher``)
into small Llama students with the recipe ``yamls/smollm2-135m-cpu.yaml``; the measured table of
``docs/real-model.md``.

Every run is the recipe through the public path (``train`` with overrides, then ``export``), on the same data,
seed and schedule (cosine over the run's own steps). Runs (``--runs``; ``--steps`` S, default 200):

* ``labels``: labels alone, S steps; ``offline``: the recipe (the teacher's precomputed top-64, alpha 0.1, T 1),
  S steps; ``online``: the same loss with the teacher model in every step, S steps;
* ``labels_cost_offline`` / ``labels_cost_online``: labels alone for the steps that cost what S distilled steps
  cost, by the quickstart's paired step-cost measurement (``quickstart/step_costs.py``: one step of each kind,
  interleaved round after round in one process, the median per-round ratio to a label-only step);
* ``offline_alpha0`` (the teacher's top-64 alone), ``offline_T2`` (temperature 2): other settings, S steps;
* ``cut_labels`` / ``cut_offline``: a student cut from the teacher (``model.student.from_teacher``: its
  embeddings, 4 of its 30 blocks, its final norm; the 4 chosen among ``CUT_CANDIDATES`` by held-out CE before
  training), for the steps that cost what S offline steps of the small student cost.

Held-out cross-entropy of every exported student and of the teacher comes from ``composer-kd eval`` (its
``evaluate_models``) on the val split of ``--heldout``, no teacher (a teacher pass per student would cost more
than the runs); the runs that read plain or precomputed data also evaluate during training every
``--eval-every`` steps (the curve: where a gap opens or closes). Each stage's record is kept in
``OUT/NAME.json`` and a rerun skips finished stages; the last line printed is the whole record as JSON.

    python benchmarks/real_teacher.py --teacher smollm2-135m --heldout smollm2-data --train smollm2-train \\
        --topk smollm2-topk --out real-teacher-out [--runs labels offline ...] [--steps 200]
"""

import argparse
import datetime
import json
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch
from composer.loggers import InMemoryLogger
from transformers import AutoModelForCausalLM

from composer_kd.config.run_config import load_config
from composer_kd.data import build_token_dataloader
from composer_kd.model.layer_pruning import cut_model
from composer_kd.model.teacher_topk_model import TeacherTopKModel
from composer_kd.quickstart.step_costs import paired_step_costs, precompute_step, training_step
from composer_kd.run.evaluate import evaluate_models
from composer_kd.run.export import export_student
from composer_kd.run.train import build_trainer, train

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / 'yamls' / 'smollm2-135m-cpu.yaml'
# Which 4 of the teacher's 30 blocks a cut student keeps: the candidates tried (held-out CE before training).
CUT_CANDIDATES = {'first 4': [0, 1, 2, 3], 'first 3 + last': [0, 1, 2, 29], 'spread': [0, 10, 20, 29]}

# name: (student, teacher, alpha, temperature, steps); steps 'S': --steps, 'cost:KIND': labels alone for what S
# steps of KIND cost; 'cut': what S offline steps of the small student cost, in steps of the cut student.
RUNS: dict[str, tuple[str, str, float, float, str]] = {
    'labels': ('small', 'labels', 1.0, 1.0, 'S'),
    'offline': ('small', 'offline', 0.1, 1.0, 'S'),
    'labels_cost_offline': ('small', 'labels', 1.0, 1.0, 'cost:offline'),
    'online': ('small', 'online', 0.1, 1.0, 'S'),
    'labels_cost_online': ('small', 'labels', 1.0, 1.0, 'cost:online'),
    'offline_alpha0': ('small', 'offline', 0.0, 1.0, 'S'),
    'offline_T2': ('small', 'offline', 0.1, 2.0, 'S'),
    'cut_labels': ('cut', 'labels', 1.0, 1.0, 'cut'),
    'cut_offline': ('cut', 'offline', 0.1, 1.0, 'cut'),
}
DEFAULT_RUNS = ['labels', 'offline', 'labels_cost_offline', 'online', 'cut_labels', 'cut_offline']


def _overrides(args: argparse.Namespace, student: str, teacher: str, alpha: float, temperature: float,
               steps: int, cut: list[int]) -> list[str]:
    """The recipe's overrides for one run; ``cut``: the teacher blocks a cut student keeps."""
    found = [f'variables.teacher={args.teacher}', f'variables.topk={args.topk}', f'variables.steps={steps}',
             'loggers={inmemory: {}}', 'log_to_console=false', 'callbacks=null', f'model.distillation.alpha={alpha}',
             f'model.distillation.temperature={temperature}', f'eval_interval={args.eval_every}ba']
    plain = [f'variables.train_data={args.train}', f'variables.eval_data={args.heldout}']
    if teacher == 'labels':
        found += ['model.teacher=null', *plain]
    elif teacher == 'online':  # evaluating with the teacher model would cost a teacher pass: composer-kd eval after
        found += ['model.teacher=null', f'model.teacher={{pretrained_model_name_or_path: {args.teacher}}}', *plain,
                  'eval_loader=null']
    if student == 'cut':  # the teacher's blocks, from its folder (a precomputed teacher has no weights to cut)
        found += ['model.student=null', (f'model.student={{from_teacher: {{layers: {cut}, '
                                         f'pretrained_model_name_or_path: {args.teacher}}}}}')]
    return found


def _train(args: argparse.Namespace, name: str, overrides: list[str]) -> dict[str, Any]:
    """One recipe run, exported to ``OUT/NAME/model``; its wall time and eval curve."""
    folder = args.out / name
    start = time.perf_counter()
    trainer = train(load_config(str(RECIPE), [*overrides, f'variables.run_name={name}',
                                              f'save_folder={folder / "checkpoints"}']))
    wall = time.perf_counter() - start
    memory = next(d for d in trainer.logger.destinations if isinstance(d, InMemoryLogger))
    curve = {metric: [(int(ts.batch), round(ts.total_wct.total_seconds(), 1), float(v))
                      for ts, v in memory.data.get(key, [])]
             for metric, key in (('ce', 'metrics/eval/LanguageCrossEntropy'),
                                 ('kd', 'metrics/eval/TeacherDivergenceLoss'),
                                 ('top1', 'metrics/eval/TeacherTop1Agreement'))}
    steps, tokens = int(trainer.state.timestamp.batch), int(trainer.state.timestamp.token)
    trainer.close()
    export_student(str(folder / 'checkpoints' / 'latest-rank0.pt'), str(folder / 'model'))
    shutil.rmtree(folder / 'checkpoints')
    return {'steps': steps, 'tokens': tokens, 'wall_s': round(wall, 1), 'curve': curve, 'overrides': overrides}


def choose_cut(args: argparse.Namespace) -> dict[str, Any]:
    """The candidate of ``CUT_CANDIDATES`` with the lowest CE on the first 8 training samples (not the held-out
    split the students are scored on), before any training."""
    from streaming import StreamingDataset
    teacher = AutoModelForCausalLM.from_pretrained(args.teacher).eval()
    samples = StreamingDataset(local=str(args.train / 'train'), shuffle=False, batch_size=1)
    batch = torch.stack([torch.from_numpy(samples[i]['tokens'].astype('int64')) for i in range(8)])

    def ce(model: torch.nn.Module) -> float:
        with torch.no_grad():
            return float(model.eval()(batch, labels=batch).loss)

    found = {'teacher_ce_8_train_samples': ce(teacher), 'candidates': {}}
    for label, blocks in CUT_CANDIDATES.items():
        found['candidates'][label] = {'blocks': blocks, 'ce_8_train_samples': ce(cut_model(teacher, blocks))}
    label = min(found['candidates'], key=lambda k: found['candidates'][k]['ce_8_train_samples'])
    student = cut_model(teacher, found['candidates'][label]['blocks'])
    return {**found, 'chosen': label, 'blocks': found['candidates'][label]['blocks'],
            'parameters': sum(p.numel() for p in student.parameters())}


def step_costs(args: argparse.Namespace, cut: list[int], kinds: list[str]) -> dict[str, Any]:
    """One training step of each kind, interleaved (``paired_step_costs``), and a precompute batch of the same
    size; ``labels`` is the reference."""
    base = ['save_folder=null', 'loggers=null', 'callbacks=null', 'progress_bar=false', 'eval_loader=null']
    settings = {'labels': ('small', 'labels', 1.0), 'offline': ('small', 'offline', 0.1),
                'online': ('small', 'online', 0.1), 'cut_labels': ('cut', 'labels', 1.0),
                'cut_offline': ('cut', 'offline', 0.1)}
    trainers = {name: build_trainer(load_config(str(RECIPE), [*_overrides(args, *settings[name], 1.0, 10**6, cut),
                                                              *base]))
                for name in ['labels', *(k for k in kinds if k != 'labels')]}
    steps: dict[str, Callable[[], None]] = {name: training_step(trainer) for name, trainer in trainers.items()}
    batch_size = trainers['labels'].state.train_dataloader.batch_size
    loader = build_token_dataloader({'local': str(args.train), 'split': 'train', 'max_seq_len': 128, 'shuffle': True,
                                     'shuffle_seed': 17}, batch_size, 2).dataloader
    teacher = AutoModelForCausalLM.from_pretrained(args.teacher)
    steps['precompute'] = precompute_step(TeacherTopKModel(teacher, 49152, 64, [1.0, 2.0]), loader, 'uint8')
    costs = paired_step_costs(steps, rounds=args.cost_rounds, warmup=2)
    for trainer in trainers.values():
        trainer.close()
    return {**costs, 'batch_size': batch_size}


def _stage(path: Path, make: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    if path.is_file():
        return json.loads(path.read_text())
    print(f'[{datetime.datetime.now():%H:%M:%S}] {path.stem} ...', flush=True)
    start = time.perf_counter()
    record = make()
    record['stage_wall_s'] = round(time.perf_counter() - start, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1))
    print(f'[{datetime.datetime.now():%H:%M:%S}] {path.stem}: {record["stage_wall_s"]} s', flush=True)
    return record


def held_out_ce(args: argparse.Namespace, folders: list[str]) -> dict[str, Any]:
    """``composer-kd eval``'s metrics of ``folders`` on the held-out split, without a teacher."""
    return evaluate_models({'models': folders, 'data': str(args.heldout), 'max_seq_len': 128})


def _steps(args: argparse.Namespace, rule: str, costs: dict[str, Any]) -> int:
    if rule == 'S':
        return args.steps
    ratio = costs['ratio']
    if rule.startswith('cost:'):  # labels alone for what S steps of the other kind cost
        return round(args.steps * ratio[rule.split(':')[1]] / ratio['labels'])
    return max(1, round(args.steps * ratio['offline'] / ratio['cut_offline']))  # 'cut'


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--teacher', type=Path, required=True, help='make-example-teacher output')
    parser.add_argument('--heldout', type=Path, required=True, help='prepare-data output whose val split is held out')
    parser.add_argument('--train', type=Path, required=True, help='prepare-data output of the training documents')
    parser.add_argument('--topk', type=Path, required=True, help='precompute-teacher output (train and val)')
    parser.add_argument('--out', type=Path, default=Path('real-teacher-out'))
    parser.add_argument('--runs', nargs='+', default=DEFAULT_RUNS, choices=list(RUNS))
    parser.add_argument('--steps', type=int, default=200, help='S, the steps of the main runs (default 200: 205k '
                        'tokens, 0.6 passes over smollm2-train at 8 x 128 tokens)')
    parser.add_argument('--eval-every', type=int, default=50, help='steps between evaluations during training')
    parser.add_argument('--cost-rounds', type=int, default=10)
    parser.add_argument('--cost-kinds', nargs='*', default=[], choices=['offline', 'online', 'cut_labels',
                                                                       'cut_offline'],
                        help='step kinds to measure besides those --runs need (the first measurement in --out is '
                        'kept and reused: measure every kind a later run will need at once)')
    args = parser.parse_args()
    for name in ('teacher', 'heldout', 'train', 'topk'):
        setattr(args, name, getattr(args, name).resolve())
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    cpu = next((line.split(':', 1)[1].strip() for line in Path('/proc/cpuinfo').read_text().splitlines()
                if line.startswith('model name')), platform.processor()) if Path('/proc/cpuinfo').is_file() else ''
    records: dict[str, Any] = {
        'machine': f'{cpu}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads',
        'load_average_at_start': os.getloadavg(),
        'date': datetime.date.today().isoformat(),
        'torch': torch.__version__,
        'steps': args.steps,
    }
    cut = None
    if any(RUNS[n][0] == 'cut' for n in args.runs) or any(k.startswith('cut') for k in args.cost_kinds):
        records['cut'] = _stage(args.out / 'cut.json', lambda: choose_cut(args))
        cut = records['cut']['blocks']
    needed = {'labels', *args.cost_kinds,
              *(RUNS[n][4].split(':')[1] for n in args.runs if RUNS[n][4].startswith('cost:'))}
    if any(RUNS[n][4] == 'cut' for n in args.runs):
        needed |= {'offline', 'cut_offline'}
    costs = None
    if needed != {'labels'}:
        costs = _stage(args.out / 'step_costs.json', lambda: step_costs(args, cut, sorted(needed)))
        missing = needed - set(costs['ratio'])
        if missing:  # the ratios of one measurement only: every equal-cost run must come from the same one
            raise SystemExit(f'{args.out / "step_costs.json"} measured {sorted(costs["ratio"])}, not {sorted(missing)}: '
                             'measure every kind at once (--cost-kinds) in a fresh --out')
        records['step_costs'] = costs
    records['teacher'] = _stage(args.out / 'teacher.json',
                                lambda: held_out_ce(args, [str(args.teacher)])[str(args.teacher)])
    records['runs'] = {}
    for name in args.runs:
        student, teacher, alpha, temperature, rule = RUNS[name]
        overrides = _overrides(args, student, teacher, alpha, temperature, _steps(args, rule, costs), cut)

        def run(n: str = name, o: list[str] = overrides) -> dict[str, Any]:
            found = _train(args, n, o)
            found['held_out'] = held_out_ce(args, [str(args.out / n / 'model')])[str(args.out / n / 'model')]
            return found

        records['runs'][name] = _stage(args.out / 'runs' / f'{name}.json', run)
    records['load_average_at_end'] = os.getloadavg()
    print(json.dumps(records))


if __name__ == '__main__':
    main()

"""``composer-kd rounds CONFIG.yaml``: multi-round distillation, each round a ``train`` run of the same config.

```yaml
rounds_folder: ./runs/${run_name}-rounds     # optional; round N lives in rounds_folder/round-N
rounds:                                      # each round: dot-list overrides of the config, applied in order
  - [max_duration=40ba]
  - [model.student.config.n_layer=1, model.distillation.alpha=0.3]
```

Round N+1's teacher is round N's exported student unless its overrides name ``model.teacher`` or
``model.teachers``. Each round folder holds ``checkpoints/`` (Composer's, autoresumed), ``student/`` (the
exported student, a ``save_pretrained`` folder) and ``metrics.json`` (written last: its presence marks the round
complete, and a rerun skips it). Every round's config is built and checked before the first round trains.
"""

import os
import time
from typing import Any, Mapping, Sequence

import torch
from composer.utils import dist

from composer_kd.builders.objects import check_registered_objects
from composer_kd.config.rounds_config import load_rounds, round_dir
from composer_kd.data.json_files import read_json, write_json
from composer_kd.errors import ConfigError
from composer_kd.run.export import export_student
from composer_kd.run.train import train

__all__ = ['run_rounds']

METRICS_FILE = 'metrics.json'
SUMMARY_FILE = 'rounds.json'


def _teacher_of(cfg: Mapping[str, Any]) -> str:
    model = cfg['model']
    if model.get('teachers') is not None:
        sources = (str(t.get('pretrained_model_name_or_path', 'config')) for t in model['teachers'])
        return 'ensemble of ' + ', '.join(sources)
    teacher = model.get('teacher')
    if teacher is None:
        return 'none (labels only)'
    return 'precomputed' if teacher.get('precomputed') else str(teacher.get('pretrained_model_name_or_path', 'config'))


def _run_round(cfg: dict[str, Any], here: str, r: int) -> dict[str, Any]:
    start = time.perf_counter()
    trainer = train(cfg)
    steps = int(trainer.state.timestamp.batch)
    metrics: dict[str, float] = {}
    if cfg.get('eval_loader') is not None:
        trainer.eval()  # at the final weights, whatever eval_interval was
        metrics = {name: float(m.compute()) for name, m in trainer.state.eval_metrics['eval'].items()}
    trainer.close()
    if dist.get_global_rank() == 0:
        export_student(os.path.join(here, 'checkpoints', 'latest-rank0.pt'), os.path.join(here, 'student'),
                       overwrite=True)
    record = {'round': r, 'run_name': cfg['run_name'], 'teacher': _teacher_of(cfg), 'steps': steps,
              'wall_s': time.perf_counter() - start, 'eval': metrics, 'student': os.path.join(here, 'student')}
    if dist.get_global_rank() == 0:
        write_json(os.path.join(here, METRICS_FILE), record)
    dist.barrier()  # the next round's teacher is this round's student, on every rank
    return record


def run_rounds(path: str, overrides: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Runs (or finishes) every round of ``path``; returns each round's record and writes ``rounds.json``.

    A round with its ``metrics.json`` is skipped; an interrupted one autoresumes from its checkpoints.
    """
    configs, folder = load_rounds(path, overrides, torch.cuda.is_available(), int(os.environ.get('WORLD_SIZE', '1')))
    for r, cfg in enumerate(configs):
        try:
            check_registered_objects(cfg)
        except ConfigError as e:
            raise ConfigError(f'rounds.{r}: {e}') from e
    records = []
    for r, cfg in enumerate(configs, start=1):
        here = round_dir(folder, r)
        done = read_json(os.path.join(here, METRICS_FILE))
        if done is not None:
            records.append(done)
            _print(f'rounds: round {r} is complete ({here}); skipped')
            continue
        records.append(_run_round(cfg, here, r))
    if dist.get_global_rank() == 0:
        write_json(os.path.join(folder, SUMMARY_FILE), records)
        print(summary_table(records), flush=True)
    return records


def _print(line: str) -> None:
    if dist.get_global_rank() == 0:
        print(line, flush=True)


def summary_table(records: Sequence[Mapping[str, Any]]) -> str:
    """A Markdown table of every round: steps, teacher and eval metrics."""
    names = sorted({name for record in records for name in record['eval']})
    lines = ['| round | steps | teacher | ' + ' | '.join(names) + ' |', '|---' * (3 + len(names)) + '|']
    for record in records:
        values = ' | '.join(f'{record["eval"][n]:.4f}' if n in record['eval'] else '' for n in names)
        lines.append(f'| {record["round"]} | {record["steps"]} | {record["teacher"]} | {values} |')
    return '\n'.join(lines)

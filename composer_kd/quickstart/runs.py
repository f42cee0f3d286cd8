"""The quickstart's runs, each through a public path: a ``train`` run of a quickstart recipe, a
``precompute-teacher`` run, and the paired step-cost measurement that sets the equal-time budgets."""

import shutil
import time
from pathlib import Path
from typing import Any, Sequence

from composer.loggers import InMemoryLogger
from transformers import AutoModelForCausalLM

from composer_kd.data import build_token_dataloader
from composer_kd.data.streaming_resources import release_shared_memory
from composer_kd.model.teacher_topk_model import TeacherTopKModel
from composer_kd.config.precompute_config import load_precompute_config
from composer_kd.config.run_config import load_config
from composer_kd.run.export import export_student
from composer_kd.run.precompute import precompute_teacher
from composer_kd.config.loading import recipe_path
from composer_kd.quickstart.step_costs import paired_step_costs, precompute_step, training_step
from composer_kd.run.train import build_trainer, train

__all__ = ['RECIPES', 'offline_overrides', 'train_run', 'precompute_run', 'step_costs_run']

RECIPES = recipe_path('quickstart/student').parent
LOGPROBS = 'uint8'


def _overrides(out: Path, max_seq_len: int, eval_interval: int, vocab_size: int, model: tuple[int, int, int],
               steps: int, seed: int) -> list[str]:
    layers, width, heads = model
    return [
        f'variables.out={out}', f'variables.vocab_size={vocab_size}', f'variables.max_seq_len={max_seq_len}',
        f'variables.n_layer={layers}', f'variables.n_embd={width}', f'variables.n_head={heads}',
        f'variables.steps={steps}', f'variables.eval_interval={min(eval_interval, steps)}', f'variables.seed={seed}'
    ]


def offline_overrides(topk: Path) -> tuple[str, ...]:
    """``student.yaml`` distilled from a ``teacher_topk`` stage's data (``topk/data``) instead of the teacher model:
    its train split holds the samples the student reads, in the order it reads them (``offline_samples_run``)."""
    data = topk / 'data'
    return ('model.teacher.precomputed=true', f'train_loader.dataset.local={data}', 'train_loader.dataset.shuffle=false',
            f'eval_loader.dataset.local={data}')


def offline_samples_run(out: Path, folder: Path, max_seq_len: int, seed: int, train_samples: int,
                        val_samples: int, batch_size: int) -> dict[str, Any]:
    """The samples an offline student reads, as MDS splits in ``folder``: ``train``, the first ``train_samples`` of
    the train split in the order ``student.yaml`` reads them (shuffled with ``seed`` by a batch of ``batch_size``,
    one process, as the run's loader does), and ``val``, the first ``val_samples`` held-out ones (what its
    evaluations read). Precomputing the teacher over these alone costs what the run uses, not the whole corpus."""
    from streaming import MDSWriter, StreamingDataset

    from composer_kd.data.packing import COLUMNS
    from composer_kd.data.tokens import TokenDataset
    counts = {}
    for split, samples, shuffle in (('train', train_samples, True), ('val', val_samples, False)):
        dataset = TokenDataset(max_seq_len=max_seq_len, local=str(out / 'data' / 'mds'), split=split, shuffle=shuffle,
                               shuffle_seed=seed, batch_size=batch_size)
        with MDSWriter(columns=COLUMNS, out=str(folder / split), compression='zstd') as writer:
            written = 0
            for item in dataset:  # the order the run's DataLoader (no workers) yields
                if written == samples:
                    break
                writer.write(StreamingDataset.__getitem__(dataset, int(item['sample_id'])))  # tokens and source
                written += 1
        release_shared_memory(dataset)
        counts[split] = written
    return {'samples': counts, 'seed': seed, 'batch_size': batch_size}


def train_run(out: Path, folder: Path, recipe: str, max_seq_len: int, eval_interval: int, vocab_size: int,
              model: tuple[int, int, int], steps: int, seed: int, extra: Sequence[str] = ()) -> dict[str, Any]:
    """One ``composer-kd train`` run of a quickstart recipe, exported to ``folder/model``.

    Returns:
        dict: ``steps``, ``wall_s``, ``tokens``, ``tokens_per_s`` and ``eval_curve``: ``[batch, seconds of
        the run so far, eval CE]`` at every evaluation.
    """
    overrides = [*_overrides(out, max_seq_len, eval_interval, vocab_size, model, steps, seed),
                 f'variables.save_folder={folder / "checkpoints"}', *extra]
    start = time.perf_counter()
    trainer = train(load_config(str(RECIPES / recipe), overrides))
    wall = time.perf_counter() - start
    memory = next(d for d in trainer.logger.destinations if isinstance(d, InMemoryLogger))
    curve = [(int(ts.batch), ts.total_wct.total_seconds(), float(v))
             for ts, v in memory.data.get('metrics/eval/LanguageCrossEntropy', [])]
    tokens = int(trainer.state.timestamp.token)
    trainer.close()
    export_student(str(folder / 'checkpoints' / 'latest-rank0.pt'), str(folder / 'model'))
    shutil.rmtree(folder / 'checkpoints')
    return {'steps': steps, 'wall_s': wall, 'tokens': tokens, 'tokens_per_s': tokens / wall, 'eval_curve': curve}


def precompute_run(out: Path, folder: Path, source: Path, max_seq_len: int, top_k: int,
                   temperature: float = 1.0) -> dict[str, Any]:
    """``composer-kd precompute-teacher`` with ``teacher_topk.yaml`` over the train and val splits of ``source`` into
    ``folder/data`` (recording ``temperature`` besides 1); returns the wall time and each split's summary."""
    start = time.perf_counter()
    splits = {}
    for split in ('train', 'val'):
        overrides = [f'variables.out={out}', f'variables.max_seq_len={max_seq_len}', f'variables.split={split}',
                     f'variables.top_k={top_k}', f'variables.logprobs={LOGPROBS}',
                     f'variables.topk_out={folder / "data"}', f'variables.source={source}']
        if temperature != 1.0:
            overrides.append(f'precompute.temperatures=[1.0,{temperature}]')
        summary = precompute_teacher(load_precompute_config(str(RECIPES / 'teacher_topk.yaml'), overrides))
        splits[split] = {k: summary[k] for k in ('samples', 'tokens', 'bytes', 'bytes_per_token', 'wall_s')}
    return {'wall_s': time.perf_counter() - start, 'top_k': top_k, 'logprobs': LOGPROBS, 'splits': splits}


def step_costs_run(out: Path, topk: Path, max_seq_len: int, vocab_size: int, model: tuple[int, int, int], seed: int,
                   distillation: Sequence[str], top_k: int, rounds: int, warmup: int) -> dict[str, Any]:
    """Paired step costs of the quickstart's students (labels only, online, offline) and of a precompute batch.

    Every contender is built from ``student.yaml`` as its stage builds it (same data, batch and model), minus
    eval, checkpoints and loggers; the precompute contender runs the teacher over batches of the same size.
    """
    base = [*_overrides(out, max_seq_len, 10**6, vocab_size, model, 10**6, seed), 'variables.save_folder=null',
            'loggers=null', 'progress_bar=false']
    no_eval = 'eval_loader=null'  # last: overrides apply in order
    recipe = str(RECIPES / 'student.yaml')
    labels_only = ('model.teacher=null', 'variables.alpha=1.0')
    trainers = {
        'labels_only': build_trainer(load_config(recipe, [*base, *labels_only, no_eval])),
        'online': build_trainer(load_config(recipe, [*base, *distillation, no_eval])),
        'offline': build_trainer(load_config(recipe, [*base, *distillation, *offline_overrides(topk), no_eval])),
    }
    steps = {name: training_step(trainer) for name, trainer in trainers.items()}
    teacher = AutoModelForCausalLM.from_pretrained(out / 'teacher' / 'model')
    batch_size = trainers['labels_only'].state.train_dataloader.batch_size
    loader = build_token_dataloader({'local': str(out / 'data' / 'mds'), 'split': 'train', 'max_seq_len': max_seq_len,
                                     'shuffle': True, 'shuffle_seed': seed}, batch_size, 0).dataloader
    steps['precompute'] = precompute_step(TeacherTopKModel(teacher, vocab_size, top_k, [1.0]), loader, LOGPROBS)
    costs = paired_step_costs(steps, rounds=rounds, warmup=warmup)
    for trainer in trainers.values():
        trainer.close()
    release_shared_memory(loader.dataset)
    return {**costs, 'batch_size': batch_size}

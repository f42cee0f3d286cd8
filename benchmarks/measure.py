"""What the benchmarks share: tiny GPT-2 models, a step's wall time, and the memory a step needs above what is
allocated before it (CUDA: ``max_memory_allocated``; CPU: the resident set's high-water mark, Linux). The scripts
import it as ``measure`` (``python benchmarks/NAME.py`` puts this folder on ``sys.path``)."""

import time
from typing import Callable

import torch
from transformers import GPT2Config, GPT2LMHeadModel

__all__ = ['gpt2', 'peak_growth', 'rss', 'timed']


def gpt2(vocab: int, layers: int, width: int, seq: int, seed: int) -> GPT2LMHeadModel:
    """A GPT-2 of ``layers`` × ``width`` (heads of 64), dropout off, initialised from ``seed``."""
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab, n_layer=layers, n_embd=width, n_head=max(1, width // 64), n_positions=seq,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config)


def timed(fn: Callable[[], None], device: torch.device) -> float:
    """Seconds ``fn()`` takes (CUDA synchronised before and after)."""
    if device.type == 'cuda':
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == 'cuda':
        torch.cuda.synchronize()
    return time.perf_counter() - start


def rss() -> tuple[int, int]:
    """(current, high-water) resident set size in bytes (Linux)."""
    fields = dict(line.split(':', 1) for line in open('/proc/self/status').read().splitlines() if ':' in line)
    return int(fields['VmRSS'].split()[0]) * 1024, int(fields['VmHWM'].split()[0]) * 1024


def peak_growth(fn: Callable[[], None], device: torch.device) -> int:
    """Bytes ``fn()`` needs above what is allocated before it."""
    if device.type == 'cuda':
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')  # resets the high-water mark to the current resident set
    base = rss()[0]
    fn()
    return rss()[1] - base

"""What the cases of the GPU smoke suite share: their sizes, their record of checks, and how one case is timed,
measured and kept apart from the next.

Shapes: B batch, T sequence length, V vocabulary, H hidden size, K top-k entries, N = B·T rows.

A case is a function ``(sizes, device) -> Report``. ``benchmarks/gpu_smoke.py`` runs every case once and writes
their reports to one JSON; ``tests/gpu/test_gpu_cases.py`` runs each under pytest and asserts its checks. In
``--dry`` mode the same functions run on the CPU at ``DRY`` sizes; a part that needs CUDA says so
(``Report.skip``) instead of being imitated.
"""

import contextlib
import dataclasses
import gc
import math
import statistics
import time
import traceback
from typing import Any, Callable, Iterator

import torch

__all__ = [
    'BF16_GRAD', 'DRY', 'GPU', 'Report', 'Sizes', 'attempt', 'autocast', 'generator', 'measure', 'rel', 'run_case',
    'short_traceback', 'synchronize', 'tf32'
]

# Bounds shared by the cases. bf16 keeps 8 significant bits (2^-9 ≈ 2e-3 relative rounding): a gradient that
# passed through bf16 logits or a bf16 matmul is within ~1e-2 of its float32 value in norm.
BF16_GRAD = 2e-2

# A Llama-3-style config at toy width (the G4 models; the vocabulary is set per size).
_LLAMA = {'model_type': 'llama', 'rope_theta': 500000.0, 'tie_word_embeddings': False, 'attention_dropout': 0.0}


def _llama(vocab: int, hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int) -> dict[str, Any]:
    return {**_LLAMA, 'vocab_size': vocab, 'hidden_size': hidden, 'num_hidden_layers': layers,
            'num_attention_heads': heads, 'num_key_value_heads': kv_heads, 'intermediate_size': intermediate,
            'max_position_embeddings': 8192}


@dataclasses.dataclass(frozen=True)
class Sizes:
    """The sizes of every case (``GPU`` for an H200-class device, ``DRY`` for CI on a CPU)."""
    vocab: int  # V, Llama-3's 128,256 on the GPU
    g1_batch: tuple[int, int]  # (B, T) of G1
    g1_hidden: int  # H of G1's heads
    topk: int  # K of the top-k losses and of G5 (the 8B precompute recipe's 64)
    g2_batch: tuple[int, int]  # (B, T) of G2 and G3
    student_hidden: int  # H of the student head in G2/G3 (float32 master weights)
    teacher_hidden: int  # H of the teacher head in G2/G3 (bf16)
    chunk_elements: tuple[int, ...]  # G2's sweep of the fused loss's rows × V per chunk
    endpoint_batch: tuple[int, int]  # (B, T) of G3's divergence endpoints
    g4_student: dict[str, Any]  # Llama configs of G4
    g4_teacher: dict[str, Any]
    g4_batch: tuple[int, int]  # (B, T) of one G4 batch; two batches run
    g4_microbatch: int
    g5_batch: tuple[int, int]  # (B, T) of G5: N = 32,768 tokens on the GPU
    g5_teacher: dict[str, Any]  # G5's teacher: Llama-3.1-8B's shape on the GPU
    temperatures: tuple[float, ...] = (1.0, 2.0)  # recorded by precompute-teacher (the 8B recipe's)
    repeats: int = 3  # timed calls after one warm-up


GPU = Sizes(
    vocab=128256,
    g1_batch=(2, 2048),
    g1_hidden=2048,
    topk=64,
    g2_batch=(4, 4096),
    student_hidden=2048,
    teacher_hidden=4096,
    chunk_elements=(1 << 25, 1 << 26, 1 << 27, 1 << 28),
    endpoint_batch=(1, 4096),
    g4_student=_llama(32768, 512, 2, 8, 4, 1408),
    g4_teacher=_llama(32768, 1024, 4, 16, 8, 2816),
    g4_batch=(4, 1024),
    g4_microbatch=2,
    g5_batch=(8, 4096),
    g5_teacher=_llama(128256, 4096, 32, 32, 8, 14336),
)

DRY = Sizes(
    vocab=512,
    g1_batch=(2, 32),
    g1_hidden=32,
    topk=16,
    g2_batch=(2, 32),
    student_hidden=32,
    teacher_hidden=64,
    chunk_elements=(1 << 11, 1 << 12, 1 << 13, 1 << 14),  # 4 … 32 rows of V = 512: several chunks of N = 64
    endpoint_batch=(1, 32),
    g4_student=_llama(256, 32, 2, 4, 2, 64),
    g4_teacher=_llama(256, 64, 2, 4, 2, 128),
    g4_batch=(4, 32),
    g4_microbatch=2,
    g5_batch=(2, 32),
    g5_teacher=_llama(512, 64, 2, 4, 2, 128),
    repeats=1,
)


class Report:
    """What a case found: its numbers (``result``), its checks against stated bounds, and the parts it could not
    run on this machine (``skipped``, part -> why)."""

    def __init__(self) -> None:
        self.result: dict[str, Any] = {}
        self.checks: list[dict[str, Any]] = []
        self.skipped: dict[str, str] = {}

    def at_most(self, name: str, value: float, bound: float) -> None:
        """Checks ``value <= bound``; NaN fails."""
        value = float(value)
        self.checks.append({'name': name, 'value': value, 'bound': bound, 'ok': value <= bound})

    def holds(self, name: str, ok: bool, detail: Any = None) -> None:
        """Records a yes/no check, with what was seen."""
        self.checks.append({'name': name, 'ok': bool(ok), **({} if detail is None else {'value': detail})})

    def skip(self, part: str, why: str) -> None:
        self.skipped[part] = why

    def failures(self) -> list[dict[str, Any]]:
        return [c for c in self.checks if not c['ok']]


def rel(a: torch.Tensor | float, b: torch.Tensor | float) -> float:
    """‖a − b‖ / ‖b‖ (numbers or tensors, norms in float64); 0 when both are 0, inf when only ``b`` is."""
    if isinstance(a, torch.Tensor):
        diff = torch.linalg.vector_norm(a.float() - b.float(), dtype=torch.float64).item()
        norm = torch.linalg.vector_norm(b.float(), dtype=torch.float64).item()
    else:
        diff, norm = abs(float(a) - float(b)), abs(float(b))
    if diff == 0.0:
        return 0.0
    return diff / norm if norm > 0 else math.inf


def generator(device: torch.device, seed: int) -> torch.Generator:
    """A generator on ``device``: inputs of GPU size are drawn where they live."""
    return torch.Generator(device=device).manual_seed(seed)


def autocast(device: torch.device, enabled: bool = True) -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device``, as Composer's ``amp_bf16`` runs forward and loss (a no-op when not enabled)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


@contextlib.contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """Float32 matmuls in TF32 (as Composer's ``DeviceGPU`` sets them for training) or in full float32 (for the
    float32 references); restores the previous setting."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def synchronize(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


_case_peak = 0  # the case's peak so far, kept across the resets of ``measure``


def _reset_peak(device: torch.device) -> None:
    global _case_peak
    if device.type == 'cuda':
        _case_peak = max(_case_peak, torch.cuda.max_memory_allocated(device))
        torch.cuda.reset_peak_memory_stats(device)


def measure(fn: Callable[[], Any], device: torch.device, repeats: int) -> tuple[dict[str, Any], Any]:
    """Times ``fn``: one warm-up call, then ``repeats`` timed calls (synchronised), each after the previous
    output is dropped; the first timed call also measures the peak memory above what was allocated before it.

    Returns:
        ``{'median_s', 'peak_growth_bytes'}`` (``None`` on the CPU) and the last call's output.
    """
    output = fn()
    times, growth = [], None
    for i in range(repeats):
        output = None
        gc.collect()
        synchronize(device)
        if i == 0 and device.type == 'cuda':
            _reset_peak(device)
            base = torch.cuda.memory_allocated(device)
        start = time.perf_counter()
        output = fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
        if i == 0 and device.type == 'cuda':
            growth = torch.cuda.max_memory_allocated(device) - base
    return {'median_s': statistics.median(times) if times else None, 'peak_growth_bytes': growth}, output


def short_traceback(error: BaseException, frames: int = 6, chars: int = 4000) -> str:
    text = ''.join(traceback.format_exception(type(error), error, error.__traceback__, limit=-frames))
    return text if len(text) <= chars else '…' + text[-chars:]


def attempt(report: Report, part: str, fn: Callable[[], Any]) -> Any:
    """Runs one part of a case: an exception fails the check ``<part>: ran`` and is kept under ``result[part]``,
    so the parts before and after it still report (``None`` is returned then)."""
    try:
        return fn()
    except Exception as error:  # noqa: BLE001 - recorded as a failed check
        report.result[part] = {'exception': short_traceback(error)}
        report.holds(f'{part}: ran', False, f'{type(error).__name__}: {str(error)[:300]}')
        return None
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def run_case(fn: Callable[[Sizes, torch.device], Report], sizes: Sizes, device: torch.device) -> dict[str, Any]:
    """Runs one case, isolated: an exception (out-of-memory included) becomes the entry's ``exception`` (a short
    traceback) and the next case starts from freed memory. Returns the case's JSON entry: ``status`` (``passed``,
    ``failed`` — a check outside its bound —, ``error`` or ``skipped``), ``time_s``, ``peak_bytes`` (the case's
    ``torch.cuda.max_memory_allocated``, reset at its start; ``None`` on the CPU), ``result``, ``checks``,
    ``skipped``."""
    global _case_peak
    gc.collect()
    if device.type == 'cuda':
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    _case_peak = 0
    entry: dict[str, Any] = {}
    synchronize(device)
    start = time.perf_counter()
    try:
        report = fn(sizes, device)
        synchronize(device)
    except Exception as error:  # noqa: BLE001 - recorded, and the next case runs
        entry.update(status='error', exception=short_traceback(error))
        del error
    else:
        entry.update(status='failed' if report.failures() else
                     'skipped' if report.skipped and not report.checks else 'passed',
                     result=report.result, checks=report.checks, skipped=report.skipped)
        del report
    entry['time_s'] = round(time.perf_counter() - start, 3)
    entry['peak_bytes'] = max(_case_peak, torch.cuda.max_memory_allocated(device)) if device.type == 'cuda' else None
    gc.collect()
    if device.type == 'cuda':
        torch.cuda.empty_cache()
    return entry



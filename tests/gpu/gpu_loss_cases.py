"""G1–G3 of the GPU smoke suite: the losses under bf16 autocast, the fused LM-head loss against the logits path
(and its chunk size), and Liger's kernels against our fused loss.

Shapes: B batch, T sequence length, V vocabulary, H hidden size, K top-k entries, N = B·T rows.

Every comparison is against a float32 reference of the same inputs; errors are relative (``‖a − b‖ / ‖b‖``
for gradients, per scalar for losses). Inputs have a realistic scale: student logits of std ~1, teacher
logits of std ~2 (entropy of a few nats at V = 128k).
"""

from typing import Any, Callable

import torch
import torch.nn.functional as F
from gpu_common import BF16_GRAD, Report, Sizes, attempt, autocast, generator, measure, rel, tf32

from composer_kd import LinearHead, distillation_loss, fused_distillation_loss, topk_distillation_loss
from composer_kd.losses import scored_positions
from composer_kd.losses.fused import default_fused_chunk_elements
from composer_kd.losses.fused_stats import fused_token_sums
from composer_kd.losses.liger import liger_distillation_loss, liger_refusal
from composer_kd.model.teacher_topk_model import topk_logprobs

__all__ = ['g1_autocast', 'g2_fused_vs_logits', 'g3_liger']

# Bounds (relative). Losses that reduce in float32 whatever autocast says give the same numbers under it: the
# same kernels run, so 1e-6 is rounding slack. Chunked float32 matmuls against one large one differ in summation
# order only (1e-5 values, 1e-4 gradients). The fused loss under autocast against the logits path under autocast:
# the same bf16 logits, up to cuBLAS picking another algorithm for a chunk of rows (1e-4); the loss value from
# bf16 logits against float32 ones, 1e-3.
SAME_KERNELS = 1e-6
FP32_CHUNKS_VALUE, FP32_CHUNKS_GRAD = 1e-5, 1e-4
BF16_SAME_LOGITS = 1e-4
BF16_VALUE = 1e-3


def _labels(B: int, T: int, V: int, device: torch.device, g: torch.Generator) -> torch.Tensor:
    labels = torch.randint(0, V, (B, T), device=device, generator=g)
    labels[:, :max(1, T // 16)] = -100  # a prompt: positions that are not scored
    return labels


def _values(out: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: float(v) for k, v in out.items()}


def _worst(a: dict[str, float], b: dict[str, float]) -> float:
    """The largest relative difference over the loss terms (total, ce, kd)."""
    return max(rel(a[k], b[k]) for k in b)


# -- G1 ---------------------------------------------------------------------------------------------------------
def _on_logits(loss: Callable[[torch.Tensor], dict[str, torch.Tensor]], logits: torch.Tensor, device: torch.device,
               amp: bool) -> tuple[dict[str, float], torch.Tensor]:
    """A loss on logits and its gradient to them, in float32 or under bf16 autocast."""
    x = logits.detach().requires_grad_(True)
    with autocast(device, amp):
        out = loss(x)
    out['total'].backward()
    return _values(out), x.grad


def g1_autocast(sizes: Sizes, device: torch.device) -> Report:
    """The dense, top-k and fused losses and the fused eval sums, under bf16 autocast against float32.

    Inputs: student and teacher logits ``(B, T, V)`` in float32 (V = 128,256, N = 4,096 on the GPU) for the
    losses on logits; hidden states ``(B, T, H)`` and float32 heads ``(V, H)`` for the fused loss and sums.
    Autocast must change nothing in a loss on float32 logits (reductions run in float32 with autocast off);
    in the fused loss it runs the heads' matmuls in bf16 — as an ``amp_bf16`` step's logits path does — and
    nothing after them.
    """
    report = Report()
    _g1_logits(report, sizes, device)
    with tf32(False):
        _g1_fused(report, sizes, device)
    return report


def _g1_logits(report: Report, sizes: Sizes, device: torch.device) -> None:
    """G1's losses on float32 logits ``(B, T, V)``: the same numbers with and without autocast."""
    B, T = sizes.g1_batch
    V, K = sizes.vocab, sizes.topk
    g = generator(device, 1)
    student = torch.randn(B, T, V, device=device, generator=g)
    teacher = torch.randn(B, T, V, device=device, generator=g).mul_(2.0)
    labels = _labels(B, T, V, device, g)
    ids, logprobs, rest = topk_logprobs(teacher.view(-1, V), K, [2.0])
    topk = (ids.view(B, T, K), logprobs.view(B, T, K), rest.view(B, T))
    losses: dict[str, Callable[[torch.Tensor], dict[str, torch.Tensor]]] = {
        'dense forward_kl T=1': lambda x: distillation_loss(x, teacher, labels, alpha=0.5),
        'dense forward_kl T=2': lambda x: distillation_loss(x, teacher, labels, alpha=0.5, temperature=2.0),
        'dense jsd T=2': lambda x: distillation_loss(x, teacher, labels, alpha=0.5, temperature=2.0,
                                                     divergence='jsd', beta=0.5),
        'topk forward_kl T=2': lambda x: topk_distillation_loss(x, topk[0], topk[1], labels, alpha=0.5,
                                                                temperature=2.0, teacher_rest_logprob=topk[2]),
        'topk reverse_kl T=2': lambda x: topk_distillation_loss(x, topk[0], topk[1], labels, alpha=0.5,
                                                                temperature=2.0, divergence='reverse_kl',
                                                                teacher_rest_logprob=topk[2]),
    }
    for name, loss in losses.items():
        fp32_values, fp32_grad = _on_logits(loss, student, device, amp=False)
        amp_values, amp_grad = _on_logits(loss, student, device, amp=True)
        report.result[name] = {'fp32': fp32_values, 'autocast': amp_values}
        report.at_most(f'{name}: loss, autocast vs fp32', _worst(amp_values, fp32_values), SAME_KERNELS)
        report.at_most(f'{name}: gradient, autocast vs fp32', rel(amp_grad, fp32_grad), SAME_KERNELS)
        del fp32_grad, amp_grad


def _g1_fused(report: Report, sizes: Sizes, device: torch.device) -> None:
    """G1's fused loss and eval sums: under autocast against the logits path under autocast (the same bf16 logits,
    every reduction in float32), and in float32 against the logits path in float32."""
    B, T = sizes.g1_batch
    V, H = sizes.vocab, sizes.g1_hidden
    g = generator(device, 2)
    hidden = torch.randn(B, T, H, device=device, generator=g)
    weight = torch.randn(V, H, device=device, generator=g).mul_(H**-0.5)
    teacher = LinearHead(torch.randn(B, T, H, device=device, generator=g),
                         torch.randn(V, H, device=device, generator=g).mul_(2 * H**-0.5))
    labels = _labels(B, T, V, device, g)
    mask = scored_positions(labels)

    def fused(amp: bool) -> tuple[dict[str, float], torch.Tensor, torch.Tensor]:
        h, w = hidden.detach().requires_grad_(True), weight.detach().requires_grad_(True)
        with autocast(device, amp):
            out = fused_distillation_loss(LinearHead(h, w), labels, teachers=[teacher], alpha=0.5)
        out['total'].backward()
        return _values(out), h.grad, w.grad

    def logits(amp: bool) -> tuple[dict[str, float], torch.Tensor, torch.Tensor, float]:
        h, w = hidden.detach().requires_grad_(True), weight.detach().requires_grad_(True)
        with autocast(device, amp):  # the heads only: the loss itself is the float32 reference
            s, t = F.linear(h, w), F.linear(teacher.hidden, teacher.weight).detach()
        out = distillation_loss(s, t, labels, alpha=0.5)
        out['total'].backward()
        top1 = float((s.detach().argmax(dim=-1) == t.argmax(dim=-1))[mask].sum())
        return _values(out), h.grad, w.grad, top1

    def sums(amp: bool) -> dict[str, float]:
        with autocast(device, amp):
            out = fused_token_sums(LinearHead(hidden, weight), labels, teachers=[teacher])
        return _values(out)

    tokens = float(mask.sum())
    for label, amp in (('autocast', True), ('fp32', False)):
        want, want_h, want_w, want_top1 = logits(amp)
        got, got_h, got_w = fused(amp)
        eval_sums = sums(amp)
        report.result[f'fused {label}'] = {'fused': got, 'logits': want, 'eval_sums': eval_sums}
        value_bound = BF16_SAME_LOGITS if amp else FP32_CHUNKS_VALUE
        grad_bound = BF16_GRAD if amp else FP32_CHUNKS_GRAD  # under autocast the logits path's gradient is bf16
        report.at_most(f'fused loss {label} vs logits path {label}', _worst(got, want), value_bound)
        report.at_most(f'fused d/dhidden {label} vs logits path', rel(got_h, want_h), grad_bound)
        report.at_most(f'fused d/dweight {label} vs logits path', rel(got_w, want_w), grad_bound)
        report.at_most(f'eval sums {label}: ce vs logits path', rel(eval_sums['ce'] / tokens, want['ce']), value_bound)
        report.at_most(f'eval sums {label}: kd vs logits path', rel(eval_sums['kd'] / tokens, want['kd']), value_bound)
        report.at_most(f'eval sums {label}: top-1 agreement vs logits path (share of tokens)',
                       abs(eval_sums['top1'] - want_top1) / tokens, 1e-3)
        report.result[f'fused {label}']['errors'] = {'loss': _worst(got, want), 'd_hidden': rel(got_h, want_h),
                                                     'd_weight': rel(got_w, want_w)}
    bf16, fp32 = report.result['fused autocast']['fused'], report.result['fused fp32']['fused']
    report.at_most('fused loss autocast vs fp32 (the bf16 heads themselves)', _worst(bf16, fp32), BF16_VALUE * 10)


# -- G2 / G3 inputs ---------------------------------------------------------------------------------------------
def _head_inputs(sizes: Sizes, batch: tuple[int, int], device: torch.device, seed: int) -> dict[str, torch.Tensor]:
    """A student head with float32 master weights ``(V, H_s)``, a bf16 teacher head ``(V, H_t)``, their hidden
    states ``(B, T, H)`` and labels ``(B, T)``."""
    B, T = batch
    V, Hs, Ht = sizes.vocab, sizes.student_hidden, sizes.teacher_hidden
    g = generator(device, seed)
    return {
        'student_hidden': torch.randn(B, T, Hs, device=device, generator=g),
        'student_weight': torch.randn(V, Hs, device=device, generator=g).mul_(Hs**-0.5),
        'teacher_hidden': torch.randn(B, T, Ht, device=device, generator=g).bfloat16(),
        'teacher_weight': torch.randn(V, Ht, device=device, generator=g).mul_(2 * Ht**-0.5).bfloat16(),
        'labels': _labels(B, T, V, device, g),
    }


def _heads(x: dict[str, torch.Tensor]) -> tuple[LinearHead, LinearHead, torch.Tensor, torch.Tensor]:
    """Fresh leaves for the student (so each call has its own gradients) and the teacher's constant head."""
    h, w = x['student_hidden'].detach().requires_grad_(True), x['student_weight'].detach().requires_grad_(True)
    return LinearHead(h, w), LinearHead(x['teacher_hidden'], x['teacher_weight']), h, w


Step = Callable[[], tuple[dict[str, float], torch.Tensor, torch.Tensor]]


def _step(x: dict[str, torch.Tensor], device: torch.device, path: str, amp: bool = True,
          **kwargs: Any) -> Step:
    """One forward + backward from the hidden states: ``path`` is ``logits`` (both heads' logits, then
    ``distillation_loss``, all inside autocast as Composer's loss runs), ``fused`` or ``liger``. Returns the loss
    terms and the gradients to the student's hidden states and head weight."""

    def run() -> tuple[dict[str, float], torch.Tensor, torch.Tensor]:
        student, teacher, h, w = _heads(x)
        with autocast(device, amp):
            if path == 'logits':
                s = F.linear(student.hidden, student.weight)
                with torch.no_grad():
                    t = F.linear(teacher.hidden, teacher.weight)
                out = distillation_loss(s, t, x['labels'], **kwargs)
            elif path == 'fused':
                out = fused_distillation_loss(student, x['labels'], teachers=[teacher], **kwargs)
            else:
                out = liger_distillation_loss(student, teacher, x['labels'], vocab_size=x['student_weight'].shape[0],
                                              **kwargs)
        out['total'].backward()
        return _values(out), h.grad, w.grad

    return run


def _errors(got: tuple[dict[str, float], torch.Tensor, torch.Tensor],
            want: tuple[dict[str, float], torch.Tensor, torch.Tensor]) -> dict[str, float]:
    return {'loss': _worst(got[0], want[0]), 'd_hidden': rel(got[1], want[1]), 'd_weight': rel(got[2], want[2])}


def _reference(x: dict[str, torch.Tensor], device: torch.device,
               **kwargs: Any) -> tuple[dict[str, float], torch.Tensor, torch.Tensor]:
    """The logits path in float32 (no autocast, no TF32; the teacher's logits are its bf16 head's): the truth the
    bf16 paths are measured against."""
    with tf32(False):
        return _step(x, device, 'logits', amp=False, **kwargs)()


# -- G2 ---------------------------------------------------------------------------------------------------------
def g2_fused_vs_logits(sizes: Sizes, device: torch.device) -> Report:
    """The fused loss against the logits path under bf16 autocast — student H = 2,048 with float32 master weights,
    teacher H = 4,096 in bf16, N = 16,384 rows, V = 128,256 on the GPU — in value, gradients, time and peak memory,
    for each chunk size of the sweep. Float32 matmuls use TF32 as in a Composer run; the reference does not.

    The result names the fastest chunk size whose errors pass (``best_chunk_elements``): the value for
    ``default_fused_chunk_elements`` on CUDA (``docs/gpu.md``).
    """
    report = Report()
    x = _head_inputs(sizes, sizes.g2_batch, device, seed=3)
    settings = {'alpha': 0.5}
    reference = _reference(x, device, **settings)
    report.result['reference_fp32'] = {'loss': reference[0]}
    with tf32(True):
        figures, logits = measure(_step(x, device, 'logits', **settings), device, sizes.repeats)
        logits_errors = _errors(logits, reference)
        report.result['logits'] = {**figures, 'errors_vs_fp32': logits_errors}
        logits_peak = figures['peak_growth_bytes']
        for key, value in logits_errors.items():
            report.at_most(f'logits path vs fp32: {key}', value, BF16_VALUE if key == 'loss' else BF16_GRAD)
        sweep = []
        for elements in sizes.chunk_elements:
            figures, fused = measure(_step(x, device, 'fused', chunk_elements=elements, **settings), device,
                                     sizes.repeats)
            entry = {'chunk_elements': elements, 'chunk_rows': max(1, elements // sizes.vocab), **figures,
                     'errors_vs_logits': _errors(fused, logits), 'errors_vs_fp32': _errors(fused, reference)}
            del fused
            ok = True
            for key, value in entry['errors_vs_logits'].items():
                bound = BF16_VALUE if key == 'loss' else BF16_GRAD
                report.at_most(f'fused (2^{elements.bit_length() - 1}) vs logits path: {key}', value, bound)
                ok = ok and value <= bound
            if figures['peak_growth_bytes'] is not None and logits_peak is not None:
                entry['memory_over_logits'] = round(figures['peak_growth_bytes'] / logits_peak, 3)
                report.at_most(f'fused (2^{elements.bit_length() - 1}) peak memory over the logits path\'s',
                               entry['memory_over_logits'], 1.0)
            if figures['median_s'] and report.result['logits']['median_s']:
                entry['time_over_logits'] = round(figures['median_s'] / report.result['logits']['median_s'], 3)
            entry['within_bounds'] = ok
            sweep.append(entry)
    report.result['fused'] = sweep
    passing = [e for e in sweep if e['within_bounds'] and e['median_s'] is not None]
    best = min(passing, key=lambda e: e['median_s']) if passing else None
    report.result['best_chunk_elements'] = None if best is None else best['chunk_elements']
    report.result['default_chunk_elements'] = default_fused_chunk_elements(device)
    return report


# -- G3 ---------------------------------------------------------------------------------------------------------
# Liger against our fused loss: Liger computes the teacher's logits in float32 from its bf16 head (torch ≥ 2.8,
# torch.mm(out_dtype=float32)) where ours rounds them to bf16 first, so the two differ by bf16 rounding.
_ENDPOINTS = {  # our divergence (arguments) -> what Liger computes it with
    'forward_kl': {},  # Liger's jsd_beta 0
    'reverse_kl': {},  # jsd_beta 1
    'jsd': {'beta': 0.5},
}


def g3_liger(sizes: Sizes, device: torch.device) -> Report:
    """Liger's fused linear JSD (float32 weight-gradient accumulation) against our fused loss, both under bf16
    autocast on G2's shapes, and each against the float32 reference; then the divergences Liger computes at its
    endpoints (β = 0 forward KL, β = 1 reverse KL) and inside (jsd, β = 0.5) at T = 2 on fewer rows, and the
    refusal of ``jsd`` at β = 0 and 1 (our jsd is identically 0 there, Liger's is a KL).
    """
    report = Report()
    x = _head_inputs(sizes, sizes.g2_batch, device, seed=4)
    student, teacher, _, _ = _heads(x)
    for beta in (0.0, 1.0):
        reason = liger_refusal(student, [teacher], None, 'jsd', x['labels'], {'beta': beta})
        report.holds(f'liger_refusal refuses jsd at beta {beta:g}', reason is not None and 'jsd with beta' in reason,
                     reason)
    why_not = liger_refusal(student, [teacher], None, 'forward_kl', x['labels'])
    report.result['liger_refusal_here'] = why_not
    del student, teacher
    settings = {'alpha': 0.5}
    reference = _reference(x, device, **settings)
    with tf32(True):
        figures, ours = measure(_step(x, device, 'fused', **settings), device, sizes.repeats)
        report.result['ours'] = {**figures, 'errors_vs_fp32': _errors(ours, reference)}
        if why_not is not None:
            report.skip('liger', why_not)
            return report
        for key, value in report.result['ours']['errors_vs_fp32'].items():
            report.at_most(f'ours vs fp32: {key}', value, BF16_VALUE if key == 'loss' else BF16_GRAD)

        def liger() -> None:
            figures, out = measure(_step(x, device, 'liger', **settings), device, sizes.repeats)
            errors = _errors(out, reference)
            report.result['liger'] = {**figures, 'errors_vs_fp32': errors, 'errors_vs_ours': _errors(out, ours),
                                      'd_weight_dtype': str(out[2].dtype)}
            for key, value in errors.items():
                report.at_most(f'liger vs fp32: {key}', value, BF16_VALUE if key == 'loss' else BF16_GRAD)

        attempt(report, 'liger', liger)
        attempt(report, 'endpoints', lambda: _g3_endpoints(report, sizes, device))
    return report


def _g3_endpoints(report: Report, sizes: Sizes, device: torch.device) -> None:
    x = _head_inputs(sizes, sizes.endpoint_batch, device, seed=5)
    endpoints: dict[str, Any] = {}
    for divergence, kwargs in _ENDPOINTS.items():
        settings = {'alpha': 0.5, 'temperature': 2.0, 'divergence': divergence, **kwargs}
        ours = _step(x, device, 'fused', **settings)()
        liger = _step(x, device, 'liger', **settings)()
        errors = _errors(liger, ours)
        endpoints[divergence] = {'ours': ours[0], 'liger': liger[0], 'errors_vs_ours': errors}
        for key, value in errors.items():
            report.at_most(f'liger {divergence} T=2 vs ours: {key}', value, BF16_VALUE if key == 'loss' else BF16_GRAD)
    report.result['endpoints'] = endpoints
    for beta in (0.0, 1.0):  # called directly, Liger's wrapper refuses too (instead of computing a KL)
        try:
            _step(x, device, 'liger', alpha=0.5, divergence='jsd', beta=beta)()
            refused = None
        except ValueError as e:
            refused = str(e)
        report.holds(f'liger_distillation_loss raises for jsd at beta {beta:g}',
                     refused is not None and 'jsd with beta' in refused, refused)


"""The GPU-only code paths, reproduced on CPU where the mechanism allows: FSDP1's meta initialisation and its
buffer casts (through Composer's own wrapping, ``fsdp1_on_cpu``), bf16 autocast, bf16 gradients scaled by
Composer's microbatch weights, Liger's settings, and Composer's out-of-memory retry of a batch.

Each test here failed on the code before its fix (issue 19 §1).
"""

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from composer import Callback, Trainer
from composer.core import State
from composer.distributed.dist_strategy import prepare_fsdp_module
from composer.loggers import InMemoryLogger, Logger
from composer.utils import FSDPConfig, dist
from fsdp1_on_cpu import fsdp1_on_cpu
from helpers import tiny_gpt2
from torch.utils.data import DataLoader

from composer_kd import DistillationModel, LinearHead, distillation_loss, token_data_spec, topk_distillation_loss
from composer_kd.callbacks import KDMonitor, PerSampleLog
from composer_kd.data.tokens import collate_tokens
from composer_kd.losses.fused import fused_distillation_loss
from composer_kd.losses.fused_stats import fused_token_sums
from composer_kd.model.metrics import TeacherDivergenceLoss
from composer_kd.model.teacher_topk_model import TeacherTopKModel, topk_logprobs
from composer_kd.builders.models import build_causal_lm

REPO = Path(__file__).resolve().parents[1]
LLAMA = {'model_type': 'llama', 'vocab_size': 64, 'hidden_size': 32, 'intermediate_size': 64, 'num_hidden_layers': 2,
         'num_attention_heads': 4, 'num_key_value_heads': 2, 'rope_theta': 500000.0}
# What Composer's mixed_precision: PURE means under amp_bf16 (Composer refuses amp precisions on CPU).
PURE_BF16 = {'param_dtype': 'bf16', 'reduce_dtype': 'bf16', 'buffer_dtype': 'bf16'}


def _wrap_fsdp1(model: torch.nn.Module, mixed_precision: Any = 'PURE') -> None:
    dist.initialize_dist('cpu')  # one process: a gloo group of one
    with fsdp1_on_cpu():
        prepare_fsdp_module(model, None, FSDPConfig(mixed_precision=mixed_precision, sync_module_states=False),
                            precision='fp32', device='cpu')


# -- §1.1: FSDP1 initialises teachers built on meta ---------------------------------------------------------------
@pytest.mark.parametrize('kind', ['distillation', 'precompute'])
def test_fsdp1_initialises_teachers_built_on_meta(kind: str) -> None:
    # Composer's FSDP1 path asks the model's direct child (FrozenTeachers) for param_init_fn; without one it calls
    # reset_parameters, which LlamaRMSNorm lacks, and raises ("Object `teachers` does not have a param_init_fn").
    teacher = build_causal_lm('model.teacher', {'config': LLAMA, 'init_device': 'meta'})
    assert all(p.is_meta for p in teacher.parameters())
    if kind == 'distillation':
        model = DistillationModel(build_causal_lm('model.student', {'config': LLAMA, 'init_device': 'meta'}),
                                  teacher, alpha=0.5)
    else:
        model = TeacherTopKModel(teacher, 64, 4, [1.0])
    _wrap_fsdp1(model)
    params = list(model.parameters())
    assert params and not any(p.is_meta for p in params) and all(bool(p.isfinite().all()) for p in params)
    norms = [m.weight for m in model.modules() if type(m).__name__ == 'LlamaRMSNorm']
    assert norms and all(bool((w == 1.0).all()) for w in norms)  # Hugging Face's own initialisation ran


@pytest.mark.slow
@pytest.mark.launcher
@pytest.mark.parametrize('recipe', ['llama3-8b-to-1b.yaml', 'llama3-8b-precompute.yaml'])
def test_the_8b_recipes_model_sections_train_under_fsdp1_with_mixed_init(tmp_path: Path, recipe: str) -> None:
    # Both 8B recipes' model sections (init_device: mixed, torch_dtype, ...) at toy size, through Composer's FSDP1
    # wrapping on 2 processes: rank 1 builds on meta and receives rank 0's weights; RoPE stays fp32 in the forward.
    from transformers import AutoConfig, AutoModelForCausalLM
    model_dir = tmp_path / 'tiny-llama'
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(**LLAMA)).save_pretrained(model_dir)
    out = tmp_path / 'result'
    env = {**os.environ, 'PYTHONPATH': str(REPO / 'tests')}
    run = subprocess.run([sys.executable, '-m', 'composer.cli.launcher', '-n', '2', '--master_port', '29641',
                          str(REPO / 'tests' / 'fsdp1_on_cpu.py'), str(out), str(REPO / 'yamls' / recipe),
                          str(model_dir)], env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [json.loads((tmp_path / f'result.rank{r}').read_text()) for r in (0, 1)]
    for result in ranks:
        assert result['student'] == 0.0 and result['teachers'] == 0.0  # rank 1's meta weights filled from rank 0
        assert result['rope_dtypes'] == ['torch.float32']
        assert len(result['losses']) == 2 and all(math.isfinite(v) for v in result['losses'])
    assert ranks[0]['losses'] == ranks[1]['losses']


# -- §1.2: rotary buffers stay float32 ------------------------------------------------------------------------------
def _rope_dtypes_in_forward(model: torch.nn.Module) -> list[torch.dtype]:
    seen: list[torch.dtype] = []
    for rotary in [m for m in model.modules() if 'inv_freq' in m._buffers]:
        rotary.register_forward_pre_hook(lambda m, a: seen.append(m.inv_freq.dtype))
    return seen


def test_fsdp1_mixed_precision_keeps_rope_buffers_float32() -> None:
    # FSDP1 casts floating buffers to buffer_dtype on its first forward: Llama-3.1's RoPE inv_freq in bf16 is a
    # phase error of ~0.9 rad at distance 512. The forward must see float32 whatever the mixed precision says.
    torch.manual_seed(0)
    reference = build_causal_lm('model.student', {'config': LLAMA})
    student, teacher = build_causal_lm('model.student', {'config': LLAMA}), build_causal_lm('m', {'config': LLAMA})
    student.load_state_dict(reference.state_dict())
    model = DistillationModel(student, teacher, alpha=0.5)
    seen = _rope_dtypes_in_forward(model)
    _wrap_fsdp1(model, PURE_BF16)
    assert {b.dtype for n, b in model.named_buffers() if n.endswith('inv_freq')} == {torch.float32}
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    position_ids = torch.arange(16)[None] * 300  # far positions: where a bf16 inv_freq is visibly wrong
    rotary = [m for m in model.model.modules() if 'inv_freq' in m._buffers][0]
    for _ in range(2):  # FSDP1 casts on the first forward; the second must see float32 too
        with torch.no_grad():
            model.model(input_ids=ids)
            model.teachers({'input_ids': ids}, 64, 1.0)
    assert seen and set(seen) == {torch.float32}
    cos, sin = rotary(torch.zeros(1, dtype=torch.float32), position_ids)
    want_cos, want_sin = reference.model.rotary_emb(torch.zeros(1), position_ids)
    assert torch.equal(cos, want_cos) and torch.equal(sin, want_sin)


def test_a_model_cast_to_bf16_still_computes_rope_in_float32() -> None:
    # LLM Foundry's master_weights_dtype casts the whole model (buffers too) with model.to(dtype).
    torch.manual_seed(0)
    student = build_causal_lm('model.student', {'config': LLAMA})
    want = student.model.rotary_emb(torch.zeros(1), torch.arange(4096)[None])
    model = DistillationModel(student, None, alpha=1.0).to(torch.bfloat16)
    got = model.model.model.rotary_emb(torch.zeros(1), torch.arange(4096)[None])
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


# -- §1.3: reductions in float32 under autocast ---------------------------------------------------------------------
B, T, V, H, K = 2, 64, 4096, 32, 64


def _inputs() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(B, T, V, generator=g) * 3, torch.randn(B, T, V, generator=g) * 3
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :5] = -100
    return student, teacher, labels


def _under_autocast(fn: Any) -> tuple[Any, Any]:
    plain = fn()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        autocast = fn()
    return plain, autocast


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    for key in a:
        assert float((a[key] - b[key]).abs()) <= 1e-6 * max(1.0, float(a[key].abs())), (key, a[key], b[key])


@pytest.mark.parametrize('divergence', ['forward_kl', 'jsd', 'tvd'])
@pytest.mark.parametrize('temperature', [1.0, 2.0])
def test_dense_loss_is_the_same_under_bf16_autocast(divergence: str, temperature: float) -> None:
    # torch.linalg.vecdot is on autocast's lower-precision list: the KD term was summed in bf16 (1e-4 off at V=4k).
    student, teacher, labels = _inputs()
    _same(*_under_autocast(lambda: distillation_loss(student, teacher, labels, alpha=0.3, temperature=temperature,
                                                     divergence=divergence)))


@pytest.mark.parametrize('divergence', ['forward_kl', 'reverse_kl'])
def test_topk_loss_is_the_same_under_bf16_autocast(divergence: str) -> None:
    student, teacher, labels = _inputs()
    ids, logprobs, rest = topk_logprobs(teacher.reshape(-1, V), K, [2.0])
    args = (student, ids.view(B, T, K), logprobs.view(B, T, K), labels)
    _same(*_under_autocast(lambda: topk_distillation_loss(*args, alpha=0.3, temperature=2.0, divergence=divergence,
                                                          teacher_rest_logprob=rest.view(B, T))))


def test_fused_loss_and_eval_sums_under_autocast_equal_the_logits_path_under_autocast() -> None:
    # Under autocast the heads' matmuls run in bf16 on both paths (as a real amp_bf16 step has them); every
    # reduction after them must run in float32 on both.
    g = torch.Generator().manual_seed(0)
    student = LinearHead(torch.randn(B, T, H, generator=g), torch.randn(V, H, generator=g) * 0.5)
    teacher = LinearHead(torch.randn(B, T, H, generator=g), torch.randn(V, H, generator=g) * 0.5)
    labels = _inputs()[2]
    with torch.autocast('cpu', dtype=torch.bfloat16):
        fused = fused_distillation_loss(student, labels, teachers=[teacher], alpha=0.3)
        sums = fused_token_sums(student, labels, teachers=[teacher])
        s_logits, t_logits = (torch.nn.functional.linear(h.hidden, h.weight) for h in (student, teacher))
        assert s_logits.dtype == torch.bfloat16
    want = distillation_loss(s_logits.float(), t_logits.float(), labels, alpha=0.3)  # float32, no autocast
    _same(fused, want)
    count = float(sums['tokens'])
    assert float(sums['kd']) / count == pytest.approx(float(want['kd']), rel=1e-6)
    assert float(sums['ce']) / count == pytest.approx(float(want['ce']), rel=1e-6)


def test_teacher_divergence_metric_is_the_same_under_autocast() -> None:
    student, teacher, labels = _inputs()

    def metric() -> dict[str, torch.Tensor]:
        m = TeacherDivergenceLoss('forward_kl', 2.0)
        m.update(student, teacher, labels)
        return {'kd': m.compute()}

    _same(*_under_autocast(metric))


# -- §1.4: Composer's microbatch weight scales bf16 gradients in float32 ----------------------------------------------
WEIGHT = 3 / 7  # bf16(3/7) is 0.2% off: a systematic error if the weight were rounded before the product


def _logits_grad(loss: Any, logits: torch.Tensor, weight: float) -> torch.Tensor:
    x = logits.detach().clone().requires_grad_(True)
    total = loss(x)['total']
    total.mul_(weight)  # what Composer does to each microbatch's loss before backward
    total.backward()
    return x.grad


@pytest.mark.parametrize('kind', ['dense', 'topk'])
def test_microbatch_weight_scales_bf16_logit_gradients_in_float32(kind: str) -> None:
    student, teacher, labels = _inputs()
    ids, logprobs, rest = topk_logprobs(teacher.reshape(-1, V), K, [1.0])

    def loss(x: torch.Tensor) -> dict[str, torch.Tensor]:
        if kind == 'dense':
            return distillation_loss(x, teacher, labels, alpha=0.3)
        return topk_distillation_loss(x, ids.view(B, T, K), logprobs.view(B, T, K), labels, alpha=0.3,
                                      teacher_rest_logprob=rest.view(B, T))

    logits = student.bfloat16()
    unscaled, scaled = _logits_grad(loss, logits, 1.0), _logits_grad(loss, logits, WEIGHT)
    assert scaled.dtype == torch.bfloat16
    # The bound is bf16's own: the exact product rounded once, bit for bit.
    assert torch.equal(scaled, (unscaled.float() * WEIGHT).bfloat16())


def test_microbatch_weight_scales_bf16_hidden_gradients_of_the_fused_loss_in_float32() -> None:
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(B, T, H, generator=g).bfloat16(), (torch.randn(V, H, generator=g) * 0.5).bfloat16()
    teacher = LinearHead(torch.randn(B, T, H, generator=g).bfloat16(), weight)
    labels = _inputs()[2]
    grads = []
    for scale in (1.0, WEIGHT):
        h = hidden.clone().requires_grad_(True)
        total = fused_distillation_loss(LinearHead(h, weight), labels, teachers=[teacher], alpha=0.3)['total']
        total.mul_(scale)
        total.backward()
        grads.append(h.grad)
    assert torch.equal(grads[1], (grads[0].float() * WEIGHT).bfloat16())


# -- §1.5: Liger ----------------------------------------------------------------------------------------------------
def test_liger_refuses_jsd_at_its_endpoints() -> None:
    # Liger turns jsd_beta 0 / 1 into forward / reverse KL; our jsd is identically 0 there.
    from composer_kd.losses.liger import liger_refusal
    g = torch.Generator().manual_seed(0)
    head = LinearHead(torch.randn(1, 4, H, generator=g), torch.randn(V, H, generator=g))
    labels = torch.randint(0, V, (1, 4), generator=g)
    for beta in (0.0, 1.0):
        reason = liger_refusal(head, [head], None, 'jsd', labels, {'beta': beta})
        assert reason is not None and 'jsd with beta' in reason, reason


def test_liger_accumulates_the_weight_gradient_in_float32(monkeypatch: pytest.MonkeyPatch) -> None:
    # Liger's kernels (and even its import, through Triton) need CUDA: the arguments our call passes are checked
    # here against a stand-in module, the numbers by the GPU suite (benchmarks/gpu_smoke.py, G3).
    import types

    from composer_kd.losses.liger import liger_distillation_loss
    liger = types.ModuleType('liger_kernel.transformers')
    monkeypatch.setitem(sys.modules, 'liger_kernel.transformers', liger)
    made: list[dict[str, Any]] = []

    def recorder(name: str) -> Any:

        class Recorded(torch.nn.Module):

            def __init__(self, **kwargs: Any) -> None:
                super().__init__()
                made.append({'class': name, **kwargs})

            def forward(self, *args: Any) -> torch.Tensor:
                return torch.zeros(())

        return Recorded

    liger.LigerFusedLinearJSD, liger.LigerFusedLinearCrossEntropyLoss = recorder('jsd'), recorder('ce')
    g = torch.Generator().manual_seed(0)
    head = LinearHead(torch.randn(1, 4, H, generator=g), torch.randn(V, H, generator=g))
    liger_distillation_loss(head, head, torch.randint(0, V, (1, 4), generator=g), vocab_size=V, alpha=0.5)
    assert {m['class'] for m in made} == {'jsd', 'ce'}
    assert all(m.get('accum_dtype') is torch.float32 for m in made), made


@pytest.mark.parametrize('beta', [0, 1])
def test_config_refuses_liger_with_jsd_endpoints(capsys: pytest.CaptureFixture, write_config: Any, beta: int) -> None:
    from helpers import assert_cli_error
    path = write_config(**{'model.distillation.fused_head': 'liger', 'model.distillation.divergence': 'jsd',
                           'model.distillation.beta': beta})
    assert_cli_error(capsys, ['train', str(path), '--check'], f'model.distillation.beta={beta}')


# -- §1.6: Composer's out-of-memory retry ---------------------------------------------------------------------------
class _OutOfMemoryOnce(Callback):
    """Raises what Composer takes for a CUDA out-of-memory error in the second microbatch of the first batch, once:
    Composer then halves the microbatch and reruns the batch without a new BATCH_START."""

    def __init__(self) -> None:
        self.forwards = 0

    def before_forward(self, state: State, logger: Logger) -> None:
        self.forwards += 1
        if self.forwards == 2:
            raise RuntimeError('CUDA out of memory. Tried to allocate 2.00 GiB (simulated)')


def _kd_run(tmp_path: Path, out_of_memory: bool) -> tuple[dict[str, float], list[dict[str, str]]]:
    g = torch.Generator().manual_seed(0)
    samples = [{'input_ids': torch.randint(0, 48, (10,), generator=g), 'sample_id': torch.tensor(i)}
               for i in range(8)]
    model = DistillationModel(tiny_gpt2(seed=1), tiny_gpt2(n_layer=2, seed=2), alpha=0.5)
    logger = InMemoryLogger()
    folder = tmp_path / ('oom' if out_of_memory else 'plain')
    callbacks = [KDMonitor(interval=1), PerSampleLog(str(folder))] + ([_OutOfMemoryOnce()] if out_of_memory else [])
    trainer = Trainer(model=model, train_dataloader=token_data_spec(DataLoader(samples, 8, collate_fn=collate_tokens)),
                      optimizers=torch.optim.SGD(model.model.parameters(), lr=0.1), max_duration='2ba',
                      device='cpu', precision='fp32', device_train_microbatch_size=4 if out_of_memory else 2,
                      callbacks=callbacks, loggers=[logger], progress_bar=False, log_to_console=False, seed=0)
    trainer.state.auto_microbatching = True  # what device_train_microbatch_size: auto sets on a GPU
    trainer.fit()
    assert trainer.state.device_train_microbatch_size == 2
    logged = {k: float(v[0][1]) for k, v in logger.data.items() if k.startswith('kd/train/')}
    with open(folder / 'samples.csv', newline='') as f:
        return logged, list(csv.DictReader(f))


def test_an_out_of_memory_retry_counts_every_token_and_sample_once(tmp_path: Path) -> None:
    plain_stats, plain_rows = _kd_run(tmp_path, out_of_memory=False)
    retried_stats, retried_rows = _kd_run(tmp_path, out_of_memory=True)
    assert set(plain_stats) == set(retried_stats) and len(plain_stats) == 5
    for name, value in plain_stats.items():
        assert retried_stats[name] == pytest.approx(value, rel=1e-9, abs=1e-12), name
    assert sorted((r['step'], r['sample_id']) for r in retried_rows) == [(s, str(i)) for s in ('0', '1')
                                                                         for i in range(8)]
    for a, b in zip(plain_rows, sorted(retried_rows, key=lambda r: (int(r['step']), int(r['sample_id'])))):
        assert float(a['kd']) == pytest.approx(float(b['kd']), rel=1e-9)

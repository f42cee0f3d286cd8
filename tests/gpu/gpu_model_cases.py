"""G4 and G5 of the GPU smoke suite: two ``amp_bf16`` training steps under Composer's FSDP1 and FSDP2 against the
unwrapped run, and ``precompute-teacher``'s top-k against the teacher's forward.

Shapes: B batch, T sequence length, V vocabulary, K top-k entries, M recorded temperatures, N = B·T tokens.
"""

import math
from typing import Any, Optional

import torch
from composer import Trainer
from composer.loggers import InMemoryLogger
from composer.utils import FSDP2Config, FSDPConfig, dist
from gpu_common import Report, Sizes, attempt, generator, measure
from torch.utils.data import DataLoader

from composer_kd import DistillationModel, token_data_spec
from composer_kd.builders.models import build_causal_lm
from composer_kd.data.tokens import collate_tokens
from composer_kd.model.teacher_topk_model import TeacherTopKModel, topk_logprobs

__all__ = ['g4_fsdp', 'g5_precompute_topk']

# G4's bounds. FSDP's PURE mixed precision runs the whole student in bf16 (norms and residual stream included,
# and bf16 gradient reduction) where the unwrapped amp_bf16 run keeps float32 weights and runs only autocast's
# ops in bf16: the two agree to bf16 accuracy, not bit for bit.
FSDP_LOSS = 1e-2  # relative, per step
FSDP_UPDATE = 5e-2  # ‖Δ_fsdp − Δ_plain‖ / ‖Δ_plain‖ over all student weights after two SGD steps
LR = 0.2

# The recipe's fsdp_config (yamls/llama3-8b-to-1b.yaml), with the sync_module_states that fsdp_settings adds for
# init_device: mixed. FSDP2 takes the settings it shares with FSDP1.
_FSDP1 = {'sharding_strategy': 'FULL_SHARD', 'mixed_precision': 'PURE', 'activation_checkpointing': True,
          'activation_checkpointing_reentrant': False, 'limit_all_gathers': True, 'sync_module_states': True}
_FSDP2 = {'mixed_precision': 'PURE', 'activation_checkpointing': True}


# -- G4 ---------------------------------------------------------------------------------------------------------
def _clean(name: str) -> str:
    return name.replace('_fsdp_wrapped_module.', '').replace('_checkpoint_wrapped_module.', '')


def _full_params(module: torch.nn.Module) -> tuple[dict[str, torch.Tensor], int]:
    """Every parameter of ``module`` (FSDP1-wrapped, FSDP2-sharded or plain) gathered whole, in float32 on the CPU,
    under its unwrapped name; and how many were still on ``meta``."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.tensor import DTensor

    def whole(p: torch.Tensor) -> torch.Tensor:
        return (p.full_tensor() if isinstance(p, DTensor) else p).detach().float().cpu().clone()

    if isinstance(module, FullyShardedDataParallel):
        with FullyShardedDataParallel.summon_full_params(module, writeback=False):
            params = dict(module.named_parameters())
            meta = sum(p.is_meta for p in params.values())
            return ({} if meta else {_clean(n): whole(p) for n, p in params.items()}), meta
    params = dict(module.named_parameters())
    meta = sum(p.is_meta for p in params.values())
    return ({} if meta else {_clean(n): whole(p) for n, p in params.items()}), meta


def _watch_rope(model: torch.nn.Module) -> list[tuple[str, float]]:
    """Records, inside every forward of a rotary module, its ``inv_freq`` dtype and largest difference from the
    float32 values it was built with (taken now, before any wrapping or cast)."""
    seen: list[tuple[str, float]] = []
    for module in model.modules():
        buffer = module._buffers.get('inv_freq')
        if buffer is None:
            continue

        def hook(m: torch.nn.Module, args: Any, want: torch.Tensor = buffer.detach().float().clone()) -> None:
            got = m.inv_freq
            seen.append((str(got.dtype).replace('torch.', ''), float((got.float() - want.to(got.device)).abs().max())))

        module.register_forward_pre_hook(hook)
    return seen


def _models(sizes: Sizes, teacher_on_meta: bool) -> DistillationModel:
    """The recipe's pair at toy size: a float32 student (seeded) and a bf16 teacher, built on ``meta`` as ranks > 0
    build it under ``init_device: mixed`` (rank 0 of a one-process run would load it), or on the CPU."""
    torch.manual_seed(0)
    student = build_causal_lm('model.student', {'config': dict(sizes.g4_student)})
    teacher = build_causal_lm('model.teacher', {'config': dict(sizes.g4_teacher), 'torch_dtype': 'bfloat16',
                                                'init_device': 'meta' if teacher_on_meta else 'cpu'})
    return DistillationModel(student, teacher, alpha=0.5, fused_head=True)


def _fit(model: DistillationModel, sizes: Sizes, device: torch.device, parallelism: Optional[dict[str, Any]],
         before_fit: Any = None) -> tuple[list[float], dict[str, torch.Tensor], Any]:
    """Two training steps of ``model`` on the same two batches; returns the logged losses, the student's weights
    after them, and what ``before_fit(trainer)`` returned (called once the Trainer has wrapped the model)."""
    B, T = sizes.g4_batch
    g = torch.Generator().manual_seed(0)
    samples = [{'input_ids': torch.randint(0, sizes.g4_student['vocab_size'], (T,), generator=g)}
               for _ in range(2 * B)]
    loader = DataLoader(samples, batch_size=B, collate_fn=collate_tokens)
    logger = InMemoryLogger()
    gpu = device.type == 'cuda'
    trainer = Trainer(model=model, train_dataloader=token_data_spec(loader),
                      optimizers=torch.optim.SGD(model.model.parameters(), lr=LR), max_duration='2ba',
                      device='gpu' if gpu else 'cpu', precision='amp_bf16' if gpu else 'fp32',
                      device_train_microbatch_size=sizes.g4_microbatch, accumulate_train_batch_on_tokens=True,
                      parallelism_config=parallelism, loggers=[logger], progress_bar=False, log_to_console=False,
                      seed=0)
    try:
        extra = before_fit(trainer) if before_fit is not None else None
        trainer.fit()
        student, _ = _full_params(trainer.state.model.model)
    finally:
        trainer.close()
    return [float(v) for _, v in logger.data['loss/train/total']], student, extra


def _update_error(after: dict[str, torch.Tensor], want: dict[str, torch.Tensor],
                  start: dict[str, torch.Tensor]) -> tuple[float, float]:
    """‖Δ − Δ_want‖ / ‖Δ_want‖ over all weights (Δ = after − start), and ‖Δ_want‖."""
    if sorted(after) != sorted(want):
        raise ValueError(f'the runs have different student weights: {sorted(set(after) ^ set(want))[:5]}')
    diff = math.sqrt(sum(float(((after[n] - start[n]) - (want[n] - start[n])).double().square().sum()) for n in want))
    norm = math.sqrt(sum(float((want[n] - start[n]).double().square().sum()) for n in want))
    return (diff / norm if norm > 0 else math.inf), norm


def _check_initialised(report: Report, label: str, teacher: dict[str, torch.Tensor], meta: int,
                       initializer_range: float) -> None:
    """The teacher built on meta got Hugging Face's initialisation once sharded (``param_init_fn``)."""
    report.holds(f'{label}: no teacher weight left on meta', meta == 0, meta)
    if meta:
        return
    report.holds(f'{label}: teacher weights finite', all(bool(t.isfinite().all()) for t in teacher.values()))
    norms = [t for n, t in teacher.items() if n.endswith('norm.weight')]
    report.holds(f'{label}: RMSNorm weights are 1 (Hugging Face\'s _init_weights ran)',
                 bool(norms) and all(bool((t == 1.0).all()) for t in norms), len(norms))
    std = float(teacher['members.0.model.embed_tokens.weight'].std())
    report.holds(f'{label}: embedding std is initializer_range', abs(std / initializer_range - 1) < 0.2, std)


def _fsdp_variant(report: Report, sizes: Sizes, device: torch.device, version: str) -> dict[str, Any]:
    """One process, ``version`` FSDP with PURE mixed precision, against the unwrapped amp_bf16 run of the same
    weights (the teacher's as FSDP initialised them)."""
    model = _models(sizes, teacher_on_meta=True)
    start = {n: p.detach().float().cpu().clone() for n, p in model.model.named_parameters()}
    rope = _watch_rope(model)
    config = FSDPConfig(**_FSDP1) if version == 'fsdp1' else FSDP2Config(**_FSDP2)
    losses, after, (teacher, meta) = _fit(model, sizes, device, {'fsdp': config},
                                          before_fit=lambda trainer: _full_params(trainer.state.model.teachers))
    del model
    _check_initialised(report, version, teacher, meta, sizes.g4_teacher.get('initializer_range', 0.02))
    plain = _models(sizes, teacher_on_meta=False)
    plain.model.load_state_dict(start)
    plain.teachers[0].load_state_dict({n.removeprefix('members.0.'): t for n, t in teacher.items()})
    want_losses, want_after, _ = _fit(plain, sizes, device, None)
    update, norm = _update_error(after, want_after, start)
    dtypes = sorted({d for d, _ in rope})
    report.holds(f'{version}: inv_freq is float32 in every forward', dtypes == ['float32'], dtypes)
    report.holds(f'{version}: inv_freq keeps its float32 values', bool(rope) and max(e for _, e in rope) == 0.0,
                 max((e for _, e in rope), default=None))
    report.holds(f'{version}: two steps logged', len(losses) == 2 == len(want_losses), losses)
    for step, (got, want) in enumerate(zip(losses, want_losses)):
        report.at_most(f'{version}: loss of step {step + 1} vs the unwrapped run', abs(got - want) / abs(want),
                       FSDP_LOSS)
    report.at_most(f'{version}: student update vs the unwrapped run', update, FSDP_UPDATE)
    return {'losses': losses, 'unwrapped_losses': want_losses, 'update_error': update, 'update_norm': norm,
            'inv_freq_dtypes': dtypes, 'rotary_forwards': len(rope)}


def g4_fsdp(sizes: Sizes, device: torch.device) -> Report:
    """Two ``amp_bf16`` steps (two microbatches each, fused LM-head loss) of a float32 Llama student distilled from
    a bf16 Llama teacher built on ``meta``, in one process under Composer's FSDP1 and FSDP2 with the recipe's
    ``PURE`` mixed precision and activation checkpointing, each against the unwrapped run: the teacher is
    initialised once sharded, the losses and the student's update equal the unwrapped run's within bf16
    tolerance, and RoPE's ``inv_freq`` is float32 — with its float32 values — inside every forward.

    On the CPU (``--dry``) only the unwrapped run runs, in float32: FSDP1 through Composer and FSDP2's meta
    initialisation need CUDA, and Composer refuses amp precisions on the CPU.
    """
    report = Report()
    if device.type == 'cuda':
        dist.initialize_dist('gpu')  # a one-process NCCL group (the Trainer would make the same one)
        for version in ('fsdp1', 'fsdp2'):  # one variant's failure must not hide the other's result
            result = attempt(report, version, lambda: _fsdp_variant(report, sizes, device, version))
            if result is not None:
                report.result[version] = result
        return report
    for version in ('fsdp1', 'fsdp2'):
        report.skip(version, 'needs CUDA (Composer\'s FSDP1 wrapping and FSDP2\'s meta initialisation)')
    model = _models(sizes, teacher_on_meta=False)
    start = {n: p.detach().float().cpu().clone() for n, p in model.model.named_parameters()}
    rope = _watch_rope(model)
    losses, after, _ = _fit(model, sizes, device, None)
    _, norm = _update_error(after, after, start)
    dtypes = sorted({d for d, _ in rope})
    report.result['unwrapped_fp32'] = {'losses': losses, 'update_norm': norm, 'inv_freq_dtypes': dtypes,
                                       'rotary_forwards': len(rope)}
    report.holds('unwrapped: two finite losses', len(losses) == 2 and all(map(math.isfinite, losses)), losses)
    report.holds('unwrapped: the steps changed the student', norm > 0, norm)
    report.holds('unwrapped: inv_freq is float32 in every forward', dtypes == ['float32'], dtypes)
    return report


# -- G5 ---------------------------------------------------------------------------------------------------------
TOPK_VALUES = 1e-4  # absolute, on log-probabilities of magnitude ~10: float32 log_softmax against float64


def g5_precompute_topk(sizes: Sizes, device: torch.device) -> Report:
    """``precompute-teacher``'s reduction of bf16 teacher logits ``(N, V)`` (32,768 × 128,256 on the GPU) to its
    top-K log-probabilities and rest masses at each recorded temperature (``topk_logprobs``): its tokens/s, and
    against the forward of a Llama-3.1-8B-shaped teacher (random bf16 weights) over the same N tokens — the
    forward alone, and the forward with the top-k as ``TeacherTopKModel`` runs them in ``precompute-teacher``.
    The first rows are checked against a float64 reference.
    """
    report = Report()
    B, T = sizes.g5_batch
    attempt(report, 'topk', lambda: _g5_topk(report, sizes, device))
    attempt(report, 'teacher', lambda: _g5_teacher(report, sizes, device, B * T))
    return report


def _g5_topk(report: Report, sizes: Sizes, device: torch.device) -> None:
    B, T = sizes.g5_batch
    N, V, K, temperatures = B * T, sizes.g5_teacher['vocab_size'], sizes.topk, list(sizes.temperatures)
    g = generator(device, 6)
    logits = torch.randn(N, V, device=device, generator=g, dtype=torch.bfloat16).mul_(2.5)
    figures, (ids, values, rest) = measure(lambda: topk_logprobs(logits, K, temperatures, V), device, sizes.repeats)
    report.result['topk'] = {**figures, 'tokens_per_s': N / figures['median_s'] if figures['median_s'] else None}
    rows = min(N, 256)
    log_p = torch.log_softmax(logits[:rows].double(), dim=-1)
    chosen = log_p.gather(1, ids[:rows])  # (rows, K) float64 log-probs of the ids it kept
    report.at_most('top-k log-probs vs float64', float((values[:rows].double() - chosen).abs().max()), TOPK_VALUES)
    report.holds('top-k is the largest K, most likely first',
                 bool((chosen >= log_p.topk(K, dim=-1).values[:, -1:] - 1e-12).all())
                 and bool((values[:rows, :-1] >= values[:rows, 1:]).all()))
    outside = torch.ones_like(log_p, dtype=torch.bool).scatter_(1, ids[:rows], False)
    for m, temperature in enumerate(temperatures):
        tempered = torch.log_softmax(log_p / temperature, dim=-1)
        want = torch.logsumexp(tempered.masked_fill(~outside, -math.inf), dim=-1)
        error = float((rest[:rows, m].double() - want).abs().max())
        report.at_most(f'rest log-mass at T={temperature:g} vs float64', error, TOPK_VALUES)


def _g5_teacher(report: Report, sizes: Sizes, device: torch.device, tokens: int) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM
    B, T = sizes.g5_batch
    fields = dict(sizes.g5_teacher)
    config = AutoConfig.for_model(fields.pop('model_type'), **fields)
    with torch.device(device):
        teacher = AutoModelForCausalLM.from_config(config, torch_dtype=torch.bfloat16, attn_implementation='sdpa')
    teacher.eval().requires_grad_(False)
    V, K, M = config.vocab_size, sizes.topk, len(sizes.temperatures)
    input_ids = torch.randint(0, V, (B, T), device=device, generator=generator(device, 7))

    @torch.no_grad()
    def forward() -> None:
        teacher(input_ids=input_ids, use_cache=False)  # the logits (N × V bf16) are dropped at once

    figures, _ = measure(forward, device, max(1, sizes.repeats - 1))
    report.result['teacher_forward'] = {**figures, 'tokens_per_s': tokens / figures['median_s']}
    precompute = TeacherTopKModel(teacher, V, K, sizes.temperatures)
    figures, out = measure(lambda: precompute({'input_ids': input_ids}), device, max(1, sizes.repeats - 1))
    report.result['precompute_forward'] = {**figures, 'tokens_per_s': tokens / figures['median_s']}
    report.holds('precompute outputs (B, T, K) ids and log-probs, (B, T, M) rest',
                 tuple(out['ids'].shape) == (B, T, K) == tuple(out['logprobs'].shape)
                 and tuple(out['rest'].shape) == (B, T, M))
    forward_s, precompute_s = report.result['teacher_forward']['median_s'], figures['median_s']
    report.result['precompute_over_forward_tokens_per_s'] = round(forward_s / precompute_s, 4)
    report.result['topk_share_of_forward'] = round(report.result['topk']['median_s'] / forward_s, 4)
    report.result['teacher_parameters'] = sum(p.numel() for p in teacher.parameters())

"""One optimizer step gives the same student whatever ``device_train_microbatch_size`` is.

The batch has uneven padding, so microbatches hold different numbers of scored tokens; only a loss that is a
token sum over a token count, with Composer weighting microbatches by that count, makes the steps agree.
"""

import pytest
import torch
from composer import Trainer
from helpers import tiny_gpt2
from torch.utils.data import DataLoader

from composer_kd import DistillationModel, token_data_spec
from composer_kd.data.teacher_topk import TEACHER_IDS, TEACHER_LOGPROBS, TEACHER_REST
from composer_kd.data.tokens import collate_tokens
from composer_kd.model.teacher_topk_model import topk_logprobs

LENGTHS = [16, 3, 11, 7, 2, 13]  # six sequences; padding differs in every microbatch split


def _with_topk_teacher(sample: dict[str, torch.Tensor], teacher: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A sample as a precomputed-teacher dataset gives it: the teacher's top-8 and its rest mass at T = 2."""
    with torch.no_grad():
        logits = teacher(sample['input_ids'][None]).logits[0]
    ids, logprobs, rest = topk_logprobs(logits, 8, [2.0])
    return {**sample, TEACHER_IDS: ids.int(), TEACHER_LOGPROBS: logprobs.half(), TEACHER_REST: rest[:, 0].half()}


def _one_step(microbatch: int, accumulate_on_tokens: bool = True, precomputed: bool = False,
              fused_head: bool = False, bf16_logits: bool = False) -> dict[str, torch.Tensor]:
    """Student parameters after one SGD step (SGD keeps the update proportional to the gradient). With
    ``bf16_logits`` the student's head returns bf16 logits (its float64 weights get their gradient through them),
    as an ``amp_bf16`` step has them."""
    g = torch.Generator().manual_seed(0)
    samples = [{'input_ids': torch.randint(0, 48, (n,), generator=g)} for n in LENGTHS]
    student = tiny_gpt2(seed=1, dtype=torch.float64)
    teacher = tiny_gpt2(n_layer=2, n_embd=24, seed=2, dtype=torch.float64)
    if bf16_logits:
        student.lm_head.register_forward_hook(lambda module, args, out: out.bfloat16())
    if precomputed:  # the teacher's top-k comes with the batch; forward KL over the buckets
        samples = [_with_topk_teacher(s, teacher) for s in samples]
        model = DistillationModel(student, None, alpha=0.4, temperature=2.0, precomputed_teacher=True,
                                  fused_head=fused_head)
    else:
        model = DistillationModel(student, teacher, alpha=0.4, temperature=2.0, divergence='jsd', fused_head=fused_head)
    loader = DataLoader(samples, batch_size=len(samples), collate_fn=collate_tokens)
    trainer = Trainer(model=model,
                      train_dataloader=token_data_spec(loader),
                      optimizers=torch.optim.SGD(student.parameters(), lr=0.5),
                      max_duration='1ba',
                      device='cpu',
                      precision='fp32',
                      device_train_microbatch_size=microbatch,
                      accumulate_train_batch_on_tokens=accumulate_on_tokens,
                      progress_bar=False,
                      log_to_console=False,
                      seed=0)
    trainer.fit()
    return {k: v.detach().clone() for k, v in student.named_parameters()}


def _relative_update_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    start = {k: v.detach() for k, v in tiny_gpt2(seed=1, dtype=torch.float64).named_parameters()}
    diff = sum(((a[k] - b[k])**2).sum() for k in a)**0.5
    update = sum(((a[k] - start[k])**2).sum() for k in a)**0.5
    assert update > 1e-3  # the step really moved the student
    return float(diff / update)


@pytest.fixture(scope='module')
def full_batch() -> dict[str, torch.Tensor]:
    return _one_step(microbatch=len(LENGTHS))


@pytest.mark.parametrize('microbatch', [1, 2, 4])
def test_same_update_for_every_microbatch_size(full_batch: dict[str, torch.Tensor], microbatch: int) -> None:
    # 4 does not divide 6: the last microbatch is smaller, as Composer allows.
    assert _relative_update_difference(_one_step(microbatch), full_batch) <= 1e-6


@pytest.mark.parametrize('microbatch', [1, 4])
def test_same_update_with_a_precomputed_teacher(microbatch: int) -> None:
    # The teacher's top-k tensors are split with the batch and padded like it.
    full = _one_step(len(LENGTHS), precomputed=True)
    assert _relative_update_difference(_one_step(microbatch, precomputed=True), full) <= 1e-6


@pytest.mark.parametrize('microbatch', [1, 4, 6])
@pytest.mark.parametrize('precomputed', [False, True])
def test_fused_head_gives_the_logits_update(microbatch: int, precomputed: bool) -> None:
    # The fused LM-head loss, split into microbatches, against the logits path on the whole batch.
    full = _one_step(len(LENGTHS), precomputed=precomputed)
    fused = _one_step(microbatch, precomputed=precomputed, fused_head=True)
    assert _relative_update_difference(fused, full) <= 1e-6


@pytest.mark.parametrize('microbatch', [1, 2, 4])
def test_same_update_for_every_microbatch_size_with_bf16_logits(microbatch: int) -> None:
    # The bound is bf16's: rounding the logits to bf16 alone moves this update by ~2e-3 against float64 logits
    # (softmax gradients cancel across the vocabulary, so per-element roundings of 2^-9 do not average away), and
    # each microbatch's logit gradient is rounded once more when it is scaled by its share of the batch. So the
    # steps agree to a few bf16 roundings, 2^-7, where weighting microbatches by samples moves it by ~0.8. (The
    # scaling itself is exact to one rounding: tests/test_gpu_paths.py.)
    full = _one_step(len(LENGTHS), bf16_logits=True)
    assert _relative_update_difference(_one_step(microbatch, bf16_logits=True), full) <= 2**-7


def test_sample_weighted_accumulation_would_differ(full_batch: dict[str, torch.Tensor]) -> None:
    # The control: weighting microbatches by samples instead of tokens changes the step noticeably.
    assert _relative_update_difference(_one_step(1, accumulate_on_tokens=False), full_batch) > 1e-2

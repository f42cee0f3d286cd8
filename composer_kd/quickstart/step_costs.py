"""What one training step of a run costs relative to another's, measured so that a busy machine cannot skew it.

Wall-clock times of whole runs move with whatever else the machine does: a run that happens to share its
cores takes longer, and an "equal time" budget derived from it is wrong. Here the contenders' steps are
*interleaved* in one process — round after round, one step of each, in a rotating order — and each round
gives a ratio to the reference; the median ratio over the rounds is what load cannot move much, because both
steps of a round see the same machine.

A step is what Composer's training loop does for a batch that is one microbatch: fetch the batch from the
run's own dataloader, forward, the loss, backward, the train-metric updates, gradient clipping (when the run
clips) and the optimizer step. Composer's per-batch bookkeeping (events, logging) is left out; it is the
same for every contender, so the ratios it would dilute are, if anything, overstated.
"""

import statistics
import time
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
from composer import Trainer
from composer.algorithms import GradientClipping

from composer_kd.data.teacher_topk import encode_sample
from composer_kd.model.teacher_topk_model import TeacherTopKModel

__all__ = ['paired_step_costs', 'precompute_step', 'training_step']


def _cycle(loader: Iterable[Any]) -> Iterator[Any]:
    while True:
        yield from loader


class _TrainingStep:
    """One training step of a built ``Trainer``'s model, dataloader and optimizer, outside ``fit``."""

    def __init__(self, trainer: Trainer) -> None:
        state = trainer.state
        self.model, self.optimizer = state.model, state.optimizers[0]
        self.metrics = self.model.get_metrics(is_train=True)
        self.clip = next((a.clipping_threshold for a in state.algorithms if isinstance(a, GradientClipping)), None)
        self.batches = _cycle(state.train_dataloader)
        self.model.train()

    def __call__(self) -> None:
        batch = next(self.batches)
        outputs = self.model(batch)
        self.model.loss(outputs, batch)['total'].backward()
        with torch.no_grad():
            outputs = self.model.eval_forward(batch, outputs)
            for metric in self.metrics.values():
                self.model.update_metric(batch, outputs, metric)
        if self.clip is not None:
            torch.nn.utils.clip_grad_norm_(self.model.model.parameters(), self.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def training_step(trainer: Trainer) -> Callable[[], None]:
    """A contender for ``paired_step_costs``: one training step of a built (not fitted) ``Trainer``."""
    return _TrainingStep(trainer)


def precompute_step(model: TeacherTopKModel, loader: Iterable[Any], encoding: str) -> Callable[[], None]:
    """A contender for ``paired_step_costs``: what ``precompute-teacher`` does for one batch of ``loader`` —
    the teacher's forward, its top-k and rest masses, and each sample encoded for MDS (the write itself, a
    buffered append, is left out)."""
    batches = _cycle(loader)
    model.eval()

    def step() -> None:
        batch = next(batches)
        out = model(batch)
        ids, logprobs, rest = (out[k].numpy() for k in ('ids', 'logprobs', 'rest'))
        lengths = batch['attention_mask'].sum(dim=1).tolist()
        for row, n in enumerate(lengths):
            rests = {t: rest[row, :n, m] for m, t in enumerate(model.temperatures)}
            encode_sample(batch['input_ids'][row, :n].numpy(), row, ids[row, :n], logprobs[row, :n], rests,
                          model.vocab_size, encoding)

    return step


def paired_step_costs(steps: Mapping[str, Callable[[], None]], rounds: int = 30, warmup: int = 5) -> dict[str, Any]:
    """Interleaves single steps of the contenders (the first is the reference) and returns their costs.

    Args:
        steps (Mapping[str, Callable]): a step of each contender (``training_step``, ``precompute_step``).
        rounds (int): measured rounds (one step of each contender per round).
        warmup (int): rounds run first and not measured.

    Returns:
        dict: ``method``, ``rounds``, ``step_s`` (median wall seconds per step of each contender) and
        ``ratio`` (each contender's median per-round ratio to the reference; the reference's is 1).
    """
    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(warmup + rounds):
        order = names[r % len(names):] + names[:r % len(names)]  # rotate who goes first
        for name in order:
            start = time.perf_counter()
            steps[name]()
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
    reference = names[0]
    ratios = {name: statistics.median(t / ref for t, ref in zip(times[name], times[reference])) for name in names}
    return {
        'method': ('median over rounds of per-round step-time ratios; one step of each contender per round, '
                   'interleaved in one process, after warm-up rounds'),
        'rounds': rounds,
        'warmup_rounds': warmup,
        'reference': reference,
        'step_s': {name: statistics.median(t) for name, t in times.items()},
        'ratio': ratios,
    }

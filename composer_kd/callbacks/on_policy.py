"""``OnPolicyDistillation``: the student writes, the teacher grades every token (GKD, Agarwal et al. 2024).

```yaml
model:
  distillation:
    divergence: reverse_kl
    on_policy: {fraction: 1.0, source_of_rest: dataset, max_new_tokens: 256, temperature: 1.0}
train_loader:
  name: prompts                   # composer-kd prepare-data --prompts
  dataset: {local: ./prompts, split: train}
```

Each training batch arrives as prompts. Before Composer counts its tokens or splits it into microbatches, this
callback's ``transform`` (the prompt ``DataSpec``'s ``batch_transforms``) turns it into a training batch: with
probability ``fraction`` — one draw per step from (seed, step), the same on every process — the student samples a
continuation of every prompt (``model/generation.py``, ``model/sampling.py``: the same continuation for a
(seed, step, sample) on any number of processes and after a resume); otherwise the rest of the batches use the
dataset's responses (``source_of_rest: dataset``; supervised KD) or continuations the teacher samples
(``teacher``; sequence-level KD). Each row becomes prompt + continuation with only the continuation scored, up to
and including its first EOS (``data/rollout_batches.py``). So token counts, ``time/token``, microbatching,
``flops_per_batch`` and Composer's out-of-memory retry all see the rewritten batch, and the hybrid loss is the
usual one, normalised by the global count of scored generated tokens. On the student's own samples the
cross-entropy weight is 0 (``alpha`` applies to dataset responses only): CE would reinforce what it already says.

Logged every batch as ``rollout/*``: the policy (1 student, 0 otherwise), generated length (mean, max), EOS and
truncation rates, generation time, generated tokens per second and the generation's FLOPs (≈ one forward of
the sampler over its sequences; not in ``flops_per_batch``); on the logits path also the teacher's mean
log-probability of the sampled tokens and the gap between the sampler's log-probabilities and the training
forward's (~0 when sampling and loss agree: a large gap means they do not).
"""

import json
import os
import time
from typing import Any, Mapping, Optional, Sequence

import torch
from composer.core import Callback, State, get_precision_context
from composer.loggers import Logger
from composer.utils import dist

from composer_kd.callbacks.unwrap import composer_model
from composer_kd.data.rollout_batches import assemble_rollout_batch, continuation_lengths
from composer_kd.model.generation import generate_continuations
from composer_kd.model.sampling import SeededGumbelSampler, row_keys, uniform_noise

__all__ = ['OnPolicyDistillation', 'SOURCES']

SOURCES = ('dataset', 'teacher')
_STUDENT_STREAM, _TEACHER_STREAM, _POLICY_STREAM = 0, 1, 2


class OnPolicyDistillation(Callback):
    """Rewrites each batch of prompts into a training batch of continuations (see the module).

    Args:
        pad_token_id (int): the tokenizer's pad id. eos_ids (Sequence[int]): ids that end a continuation.
        seed (int): the run's seed (with the step and sample id, it decides every sample).
        fraction (float): share of steps on the student's own samples (GKD's lambda). Default: ``1.0``.
        source_of_rest (str): ``'dataset'`` or ``'teacher'``: the continuations of the other steps.
        max_new_tokens (int): the generation budget. Default: ``256``.
        temperature (float): sampling temperature. top_k (int): 0 for none. top_p (float): 1 for none.
        generate_batch_size (int, optional): prompts per ``generate`` call (default: the whole device batch).
        sample_log (str, optional): a folder where each process appends its steps' continuations as JSON lines
            (``rollouts-rank{R}.jsonl``: step, sample id, policy, token ids) to read or compare runs by; a
            resumed run appends the steps it replays again.
    """

    def __init__(self, pad_token_id: int, eos_ids: Sequence[int], seed: int, fraction: float = 1.0,
                 source_of_rest: str = 'dataset', max_new_tokens: int = 256, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, generate_batch_size: Optional[int] = None,
                 sample_log: Optional[str] = None) -> None:
        if source_of_rest not in SOURCES:
            raise ValueError(f'source_of_rest must be one of {list(SOURCES)}, got {source_of_rest!r}')
        self.pad_token_id, self.eos_ids, self.seed = int(pad_token_id), [int(i) for i in eos_ids], int(seed)
        self.fraction, self.source_of_rest = float(fraction), source_of_rest
        self.max_new_tokens, self.generate_batch_size = int(max_new_tokens), generate_batch_size
        self.temperature, self.top_k, self.top_p = float(temperature), int(top_k), float(top_p)
        self.sample_log = sample_log
        self._state: Optional[State] = None
        self._stats: dict[str, float] = {}

    # -- which continuations a step trains on ----------------------------------------------------------------------
    def policy(self, step: int) -> str:
        """``'student'`` for a step on the student's own samples, else ``source_of_rest``; a function of (seed, step)
        alone, so every process and a resumed run decide the same."""
        draw = float(uniform_noise(row_keys(self.seed, step, torch.zeros(1, dtype=torch.long), _POLICY_STREAM), 0,
                                   1)[0, 0])
        return 'student' if draw < self.fraction else self.source_of_rest

    def fit_start(self, state: State, logger: Logger) -> None:
        self._state = state

    def _generate(self, state: State, batch: Mapping[str, torch.Tensor], who: str,
                  step: int) -> tuple[torch.Tensor, torch.Tensor]:
        model = composer_model(state)
        if who == 'student':
            member = root = model.model
            prime = lambda: root(input_ids=batch['prompt_ids'][:1, -1:])  # noqa: E731
        else:
            member = root = model.teachers.members[0]
            prime = lambda: model.teachers({'input_ids': batch['prompt_ids'][:1, -1:]}, model.vocab_size, 1.0)  # noqa
        stream = _STUDENT_STREAM if who == 'student' else _TEACHER_STREAM
        size = self.generate_batch_size or batch['prompt_ids'].shape[0]
        tokens, logprobs = [], []
        for start in range(0, batch['prompt_ids'].shape[0], size):
            rows = slice(start, start + size)
            sampler = SeededGumbelSampler(row_keys(self.seed, step, batch['sample_id'][rows], stream),
                                          batch['prompt_ids'].shape[1], self.temperature, self.top_k, self.top_p)
            with get_precision_context(state.precision):
                out, lp = generate_continuations(member, batch['prompt_ids'][rows], batch['prompt_mask'][rows], sampler,
                                                 self.max_new_tokens, self.eos_ids, self.pad_token_id,
                                                 dist.get_world_size(), root, prime)
            tokens.append(out)
            logprobs.append(lp)
        width = max(t.shape[1] for t in tokens)
        pad = lambda t, value: torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)  # noqa: E731
        return torch.cat([pad(t, self.pad_token_id) for t in tokens]), torch.cat([pad(lp, 0.0) for lp in logprobs])

    def transform(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """A batch of prompts → the training batch of this step (the prompt ``DataSpec``'s ``batch_transforms``)."""
        state = self._state
        if state is None:
            raise RuntimeError('OnPolicyDistillation.transform runs inside fit: add the callback to the Trainer')
        batch = state.device.batch_to_device(dict(batch))
        step = int(state.timestamp.batch)
        who = self.policy(step)
        start = time.perf_counter()
        aligned = {}
        if who == 'dataset':
            tokens, available = batch['response_ids'], batch['response_mask'].sum(dim=1)
            lengths, ended = continuation_lengths(tokens, self.eos_ids, available)
        else:
            tokens, logprobs = self._generate(state, batch, who, step)
            lengths, ended = continuation_lengths(tokens, self.eos_ids)
            aligned['sampler_logprobs'] = logprobs
        seconds = time.perf_counter() - start
        rollout = assemble_rollout_batch(batch['prompt_ids'], batch['prompt_mask'], tokens, lengths, self.pad_token_id,
                                         aligned)
        rollout['sample_id'] = batch['sample_id']
        rollout['on_policy'] = who == 'student'
        if who != 'dataset':
            rollout['sampler_temperature'] = self.temperature
        self._record(state, who, lengths, ended, seconds, rollout)
        if self.sample_log is not None:
            self._log_samples(step, who, batch['sample_id'], tokens, lengths)
        return rollout

    def _log_samples(self, step: int, who: str, sample_ids: torch.Tensor, tokens: torch.Tensor,
                     lengths: torch.Tensor) -> None:
        os.makedirs(self.sample_log, exist_ok=True)
        with open(os.path.join(self.sample_log, f'rollouts-rank{dist.get_global_rank()}.jsonl'), 'a') as f:
            for sample, row, n in zip(sample_ids.tolist(), tokens.tolist(), lengths.tolist()):
                f.write(json.dumps({'step': step, 'sample_id': sample, 'policy': who, 'tokens': row[:n]}) + '\n')

    def _record(self, state: State, who: str, lengths: torch.Tensor, ended: torch.Tensor, seconds: float,
                rollout: Mapping[str, torch.Tensor]) -> None:
        generated = who != 'dataset'
        truncated = (~ended) & (lengths >= self.max_new_tokens) if generated else torch.zeros_like(ended)
        flops = 0
        if generated:
            model = composer_model(state)
            flops = model.member_forward_flops(0 if who == 'student' else 1, *rollout['input_ids'].shape)
        self._stats = {'rows': float(lengths.numel()), 'length_sum': float(lengths.sum()),
                       'length_max': float(lengths.max()) if lengths.numel() else 0.0, 'ended': float(ended.sum()),
                       'truncated': float(truncated.sum()), 'seconds': seconds if generated else 0.0,
                       'generated_tokens': float(lengths.sum()) if generated else 0.0, 'flops': float(flops),
                       'on_policy': float(who == 'student')}

    def before_train_batch(self, state: State, logger: Logger) -> None:
        composer_model(state).rollout_sums = {}  # Composer's OOM retry restarts from here: sums restart too

    def after_train_batch(self, state: State, logger: Logger) -> None:
        model = composer_model(state)
        sums, model.rollout_sums = model.rollout_sums or {}, None
        stats = self._stats
        if not stats:
            return
        names = ['rows', 'length_sum', 'ended', 'truncated', 'generated_tokens', 'flops']
        extra = sorted(sums)
        packed = torch.tensor([stats[n] for n in names] + [float(sums[n]) for n in extra], dtype=torch.float64,
                              device=state.device.tensor_to_device(torch.zeros(1)).device)
        dist.all_reduce(packed, reduce_operation='SUM')
        peaks = torch.tensor([stats['length_max'], stats['seconds']], dtype=torch.float64, device=packed.device)
        dist.all_reduce(peaks, reduce_operation='MAX')
        total = dict(zip(names + extra, packed.tolist()))
        rows = max(total['rows'], 1.0)
        metrics = {'rollout/on_policy': stats['on_policy'], 'rollout/generated_length_mean': total['length_sum'] / rows,
                   'rollout/generated_length_max': peaks[0].item(), 'rollout/eos_rate': total['ended'] / rows,
                   'rollout/truncation_rate': total['truncated'] / rows}
        if stats['generated_tokens']:
            metrics.update({'rollout/generation_seconds': peaks[1].item(), 'rollout/generation_flops': total['flops'],
                            'rollout/generated_tokens_per_second': total['generated_tokens'] / max(peaks[1].item(),
                                                                                                  1e-9)})
        if total.get('tokens'):
            for name in ('teacher_logprob', 'sampler_gap', 'sampler_abs_gap'):
                if name in total:
                    metrics[f'rollout/{name}'] = total[name] / total['tokens']
        logger.log_metrics(metrics)

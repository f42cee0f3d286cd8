"""On-policy distillation (``model.distillation.on_policy``): the sampler samples the distribution it claims and
depends on (seed, step, sample) alone; rollout batches score exactly the continuation up to its first EOS; the
loss on a rollout batch equals a plain reference; ``fraction: 0`` is ordinary distillation on the dataset's
responses; prompt datasets are made as documented; the recipe runs. (1 vs 2 processes, kill -9 and uneven EOS
across ranks: ``test_on_policy_launcher.py``.)"""

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from composer import Trainer
from helpers import tiny_gpt2
from reference import divergence, softmax
from torch.utils.data import DataLoader

from composer_kd import DistillationModel, token_data_spec
from composer_kd.data.prompts import PromptDataset, collate_prompts, prepare_prompts
from composer_kd.data.rollout_batches import assemble_rollout_batch, continuation_lengths, supervised_batch
from composer_kd.model.generation import generate_continuations
from composer_kd.model.sampling import SeededGumbelSampler, row_keys, uniform_noise

V = 48


# -- the sampler ----------------------------------------------------------------------------------------------------
def test_uniform_noise_is_uniform_and_keyed() -> None:
    keys = row_keys(17, 3, torch.arange(4))
    u = uniform_noise(keys, 5, 20000)
    assert u.shape == (4, 20000) and float(u.min()) > 0 and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.01 and abs(float(u.var()) - 1 / 12) < 0.005
    assert torch.equal(u[1:2], uniform_noise(keys[1:2], 5, 20000))  # a row's noise does not depend on the others
    assert not torch.equal(u[0], u[1]) and not torch.equal(u, uniform_noise(keys, 6, 20000))
    assert not torch.equal(keys, row_keys(18, 3, torch.arange(4))) and not torch.equal(keys, row_keys(17, 4,
                                                                                                    torch.arange(4)))


@pytest.mark.parametrize('temperature,top_k,top_p', [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 3, 1.0), (1.3, 0, 0.8)])
def test_gumbel_sampler_draws_from_the_filtered_tempered_distribution(temperature: float, top_k: int,
                                                                      top_p: float) -> None:
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    draws = 30000
    sampler = SeededGumbelSampler(row_keys(5, 0, torch.arange(draws)), prompt_width=0, temperature=temperature,
                                  top_k=top_k, top_p=top_p)
    noisy = sampler(torch.zeros((draws, 0), dtype=torch.long), logits.expand(draws, -1))
    counts = torch.bincount(noisy.argmax(-1), minlength=6).double() / draws
    p = torch.tensor(softmax(logits[0].tolist(), temperature), dtype=torch.float64)
    if top_k:
        p[p.argsort(descending=True)[top_k:]] = 0
    if top_p < 1:
        order = p.argsort(descending=True)
        before = p[order].cumsum(0) - p[order]
        p[order[before >= top_p]] = 0
    p /= p.sum()
    sigma = (p * (1 - p) / draws).sqrt()
    assert torch.all((counts - p).abs() <= 4 * sigma + 1e-12), (counts, p)  # 4 standard errors
    taken = torch.cat(sampler.logprobs)
    assert torch.allclose(taken, p.log()[noisy.argmax(-1)].float(), atol=1e-5)  # what each draw was sampled with


@pytest.fixture(scope='module')
def student() -> torch.nn.Module:
    return tiny_gpt2(V, n_layer=2, n_embd=32, seed=4).eval()


def _prompts(rows: list[list[int]], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    batch = collate_prompts([{'prompt_ids': torch.tensor(r), 'response_ids': torch.zeros(0, dtype=torch.long),
                              'sample_id': torch.tensor(i)} for i, r in enumerate(rows)], pad_token_id=0,
                            prompt_width=width)
    return batch['prompt_ids'], batch['prompt_mask']


def test_a_sample_depends_on_seed_step_and_sample_id_not_on_its_batch(student: torch.nn.Module) -> None:
    # The continuation of prompt 7 at step 3 is the same alone, in a batch of three in another order, and on
    # "another process" (a batch holding it with other prompts); another step or seed gives another one.
    prompts = {5: [3, 4, 5], 7: [9, 10, 11, 12, 13], 9: [20]}

    def sample(ids: list[int], step: int = 3, seed: int = 17) -> dict[int, list[int]]:
        prompt, mask = _prompts([prompts[i] for i in ids], width=6)
        sampler = SeededGumbelSampler(row_keys(seed, step, torch.tensor(ids)), 6)
        tokens, _ = generate_continuations(student, prompt, mask, sampler, 12, [47], 0, world_size=1)
        return {i: row.tolist() for i, row in zip(ids, tokens)}

    together, alone = sample([5, 7, 9]), sample([7])
    assert together[7] == alone[7] == sample([9, 7])[7]
    assert sample([7], step=4)[7] != alone[7] and sample([7], seed=18)[7] != alone[7]
    assert len({tuple(v) for v in together.values()}) == 3


def test_sampler_log_probs_are_the_training_forwards(student: torch.nn.Module) -> None:
    # The gap the rollout logs: the sampler's log-prob of each token it took, against a plain forward over the
    # finished sequence (cached decoding vs one pass, left padding vs right alignment) — float32 round-off only.
    prompt, mask = _prompts([[3, 4, 5], [9, 10, 11, 12, 13]], width=6)
    sampler = SeededGumbelSampler(row_keys(1, 0, torch.tensor([0, 1])), 6, temperature=0.8)
    tokens, logprobs = generate_continuations(student, prompt, mask, sampler, 10, [47], 0, world_size=1)
    lengths, _ = continuation_lengths(tokens, [47])
    batch = assemble_rollout_batch(prompt, mask, tokens, lengths, 0, {'sampler_logprobs': logprobs})
    with torch.no_grad():
        logp = torch.log_softmax(student(input_ids=batch['input_ids'],
                                         attention_mask=batch['attention_mask']).logits / 0.8, dim=-1)
    scored = batch['labels'][:, 1:] != -100
    forward = logp[:, :-1].gather(2, batch['labels'][:, 1:].clamp(min=0)[..., None]).squeeze(2)[scored]
    assert scored.sum() == lengths.sum() and torch.allclose(forward, batch['sampler_logprobs'][:, 1:][scored],
                                                            atol=1e-5)


# -- rollout batches ------------------------------------------------------------------------------------------------
def test_the_first_eos_is_scored_even_when_pad_is_eos_and_nothing_after_it() -> None:
    eos = pad = 2
    prompt, mask = _prompts([[5, 6], [7, 8, 9]], width=4)
    continuations = torch.tensor([[11, 2, 2, 2, 2],  # ends at its second token (EOS = pad after it)
                                  [12, 13, 14, 15, 16]])  # never ends: truncated at the budget
    lengths, ended = continuation_lengths(continuations, [eos])
    assert lengths.tolist() == [2, 5] and ended.tolist() == [True, False]
    batch = assemble_rollout_batch(prompt, mask, continuations, lengths, pad)
    assert batch['input_ids'].tolist() == [[5, 6, 11, 2, 2, 2, 2, 2], [7, 8, 9, 12, 13, 14, 15, 16]]
    assert batch['attention_mask'].tolist() == [[1, 1, 1, 1, 0, 0, 0, 0], [1] * 8]
    assert batch['labels'].tolist() == [[-100, -100, 11, 2, -100, -100, -100, -100],
                                        [-100, -100, -100, 12, 13, 14, 15, 16]]
    empty = continuation_lengths(torch.tensor([[2, 3, 4]]), [2])
    assert empty[0].tolist() == [1] and empty[1].tolist() == [True]  # EOS at once: just the EOS is scored


def test_dataset_responses_are_scored_whole() -> None:
    batch = collate_prompts([{'prompt_ids': torch.tensor([1, 2]), 'response_ids': torch.tensor([3, 4, 9]),
                              'sample_id': torch.tensor(0)},
                             {'prompt_ids': torch.tensor([5]), 'response_ids': torch.tensor([6]),
                              'sample_id': torch.tensor(1)}], pad_token_id=0, prompt_width=3)
    out = supervised_batch(batch, eos_ids=[9], pad_token_id=0)
    assert out['input_ids'].tolist() == [[1, 2, 3, 4, 9], [5, 6, 0, 0, 0]]
    assert out['labels'].tolist() == [[-100, -100, 3, 4, 9], [-100, 6, -100, -100, -100]]


# -- the loss on a rollout batch --------------------------------------------------------------------------------------
def _reference_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, name: str,
                    temperature: float, **kwargs: float) -> float:
    """Mean over the scored continuation tokens of T²·D(teacher‖student) by the textbook formulas."""
    terms = []
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            if labels[b, t + 1] == -100:
                continue
            p = softmax(teacher_logits[b, t].tolist(), temperature)
            q = softmax(student_logits[b, t].tolist(), temperature)
            terms.append(temperature**2 * divergence(name, p, q, **kwargs))
    return sum(terms) / len(terms)


@pytest.mark.parametrize('name,kwargs', [('forward_kl', {}), ('reverse_kl', {}), ('jsd', {'beta': 0.3}),
                                         ('skew_kl', {'lam': 0.2}), ('skew_reverse_kl', {'lam': 0.1}), ('tvd', {})])
def test_loss_on_a_generated_batch_equals_a_plain_reference(student: torch.nn.Module, name: str, kwargs: dict) -> None:
    teacher = tiny_gpt2(V, n_layer=2, n_embd=24, seed=6).double()
    prompt, mask = _prompts([[3, 4, 5], [9, 10, 11, 12, 13], [20]], width=6)
    sampler = SeededGumbelSampler(row_keys(3, 1, torch.arange(3)), 6)
    tokens, _ = generate_continuations(student, prompt, mask, sampler, 8, [47], 0, world_size=1)
    batch = assemble_rollout_batch(prompt, mask, tokens, continuation_lengths(tokens, [47])[0], 0)
    batch['on_policy'] = True
    model = DistillationModel(tiny_gpt2(V, n_layer=2, n_embd=32, seed=4).double(), teacher, alpha=0.7,
                              temperature=2.0, divergence=name, **kwargs).train()
    losses = model.loss(model(batch), batch)
    with torch.no_grad():
        s = model.model(input_ids=batch['input_ids'], attention_mask=batch['attention_mask']).logits
        t = teacher(input_ids=batch['input_ids'], attention_mask=batch['attention_mask']).logits
    want = _reference_loss(s, t, batch['labels'], name, 2.0, **kwargs)
    # alpha 0.7 is the dataset batches' CE weight; on the student's own samples the loss is the divergence alone.
    assert float(losses['total']) == pytest.approx(want, rel=1e-9, abs=1e-12)


# -- fraction 0: ordinary distillation on the dataset's responses ------------------------------------------------------
def _samples() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [{'prompt_ids': torch.randint(3, V, (int(n),), generator=g),
             'response_ids': torch.cat([torch.randint(3, V, (int(r),), generator=g), torch.tensor([2])]),
             'sample_id': torch.tensor(i)} for i, (n, r) in enumerate([(3, 4), (5, 2), (2, 6), (4, 3)] * 2)]


def _one_step(on_policy: bool) -> dict[str, torch.Tensor]:
    from composer.core import DataSpec

    from composer_kd.callbacks import OnPolicyDistillation
    from composer_kd.data.tokens import count_tokens
    student, teacher = tiny_gpt2(V, seed=1, dtype=torch.float64), tiny_gpt2(V, n_layer=2, seed=2,
                                                                             dtype=torch.float64)
    model = DistillationModel(student, teacher, alpha=0.4, temperature=2.0, divergence='jsd')
    collate = lambda s: collate_prompts(s, pad_token_id=0, prompt_width=5)  # noqa: E731
    callbacks: list[Any] = []
    if on_policy:  # fraction 0: every step on the dataset's responses, through the rollout
        rollout = OnPolicyDistillation(0, [2], seed=17, fraction=0.0, temperature=2.0)
        spec = DataSpec(DataLoader(_samples(), batch_size=8, collate_fn=collate), get_num_tokens_in_batch=count_tokens,
                        batch_transforms=rollout.transform, get_num_samples_in_batch=lambda b: len(b['input_ids']))
        callbacks.append(rollout)
    else:  # the same prompt + response batches, made beforehand: plain distillation on labelled data
        batches = [supervised_batch(collate(_samples()), [2], 0)]
        spec = token_data_spec(DataLoader(batches, batch_size=None))
    Trainer(model=model, train_dataloader=spec, optimizers=torch.optim.SGD(student.parameters(), lr=0.5),
            max_duration='1ba', device='cpu', precision='fp32', device_train_microbatch_size=3, callbacks=callbacks,
            accumulate_train_batch_on_tokens=True, progress_bar=False, log_to_console=False, seed=0).fit()
    return {k: v.detach().clone() for k, v in student.named_parameters()}


def test_fraction_zero_is_distillation_on_the_datasets_responses() -> None:
    got, want = _one_step(on_policy=True), _one_step(on_policy=False)
    start = dict(tiny_gpt2(V, seed=1, dtype=torch.float64).named_parameters())
    assert max(float((got[k] - start[k]).abs().max()) for k in got) > 1e-4  # the step moved the student
    for k in got:
        assert torch.allclose(got[k], want[k], rtol=0, atol=1e-12), k


# -- prompt datasets --------------------------------------------------------------------------------------------------
def test_prompt_datasets_from_prompt_response_and_chat_records(tmp_path: Path, tiny_assets: Path) -> None:
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tiny_assets / 'tokenizer')
    tokenizer.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|endoftext|>{% endfor %}"
                               "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    records = [{'prompt': 'def add(a, b):', 'response': '    return a + b'},
               {'prompt': 'x' * 400},  # long: cut to its last tokens
               {'messages': [{'role': 'user', 'content': 'say hi'}, {'role': 'assistant', 'content': 'hi'}]},
               {'messages': [{'role': 'user', 'content': 'ask'}]}]
    source = tmp_path / 'p.jsonl'
    source.write_text(''.join(json.dumps(r) + '\n' for r in records))
    with pytest.raises(Exception, match='p.jsonl:2: the prompt has .* tokens, more than --max-prompt-len 32'):
        prepare_prompts([str(source)], tokenizer, str(tmp_path / 'refused'), max_prompt_len=32)
    assert not (tmp_path / 'refused').exists()
    summary = prepare_prompts([str(source)], tokenizer, str(tmp_path / 'out'), max_prompt_len=32, overflow='cut',
                              val_fraction=0.0)
    assert summary['train'] == {'prompts': 4, 'with_response': 2} and summary['cut_prompts'] == 1
    rows = {i: PromptDataset(local=str(tmp_path / 'out'), split='train', shuffle=False)[i] for i in range(4)}
    eos = tokenizer.eos_token_id
    first = tokenizer('def add(a, b):')['input_ids']
    assert rows[0]['prompt_ids'].tolist() == first
    assert rows[0]['response_ids'].tolist() == tokenizer('    return a + b', add_special_tokens=False)['input_ids'] + [eos]
    assert len(rows[1]['prompt_ids']) == 32 and rows[1]['response_ids'].numel() == 0
    chat_prompt = tokenizer('<|user|>say hi<|endoftext|><|assistant|>', add_special_tokens=False)['input_ids']
    assert rows[2]['prompt_ids'].tolist() == chat_prompt
    assert rows[2]['response_ids'].tolist() == tokenizer('hi<|endoftext|>', add_special_tokens=False)['input_ids']
    assert rows[3]['response_ids'].numel() == 0


@pytest.mark.parametrize('overrides,match', [
    (['model.distillation.on_policy.temperature=2.0'], 'differs from model.distillation.temperature=1.0'),
    (['train_loader.name=text'], 'set train_loader.name: prompts'),
    (['model.teacher=null'], 'needs a teacher model'),
    (['model.distillation.on_policy.top_p=0'], 'model.distillation.on_policy.top_p must be a number in (0, 1]'),
    (['model.distillation.on_policy.max_new_tokens=500'], 'exceed the student\'s 128 positions'),
])
def test_bad_on_policy_settings_are_refused(capsys: pytest.CaptureFixture, tmp_path: Path, tiny_assets: Path,
                                            overrides: list[str], match: str) -> None:
    from helpers import assert_cli_error
    recipe = Path(__file__).resolve().parents[1] / 'yamls' / 'tiny-cpu-on-policy.yaml'
    assert_cli_error(capsys, ['train', str(recipe), f'variables.assets={tiny_assets}',
                              f'save_folder={tmp_path}/runs', *overrides], match)


def test_the_on_policy_recipe_trains(tmp_path: Path, tiny_assets: Path) -> None:
    from composer.loggers import InMemoryLogger

    from composer_kd.config.run_config import load_config
    from composer_kd.run.train import train
    recipe = Path(__file__).resolve().parents[1] / 'yamls' / 'tiny-cpu-on-policy.yaml'
    cfg = load_config(str(recipe), [f'variables.assets={tiny_assets}', f'save_folder={tmp_path}/ckpt',
                                    'loggers={inmemory: {}}', 'max_duration=4ba', 'log_to_console=false',
                                    f'model.distillation.on_policy.sample_log={tmp_path}/samples'])
    trainer = train(cfg)
    memory = next(d for d in trainer.logger.destinations if isinstance(d, InMemoryLogger))
    policies = [v for _, v in memory.data['rollout/on_policy']]
    assert len(policies) == 4 and 0 < sum(policies) < 4  # fraction 0.5: some steps of each kind
    gaps = [abs(float(v)) for _, v in memory.data['rollout/sampler_abs_gap']]
    assert gaps and max(gaps) < 1e-4  # sampling and the loss's forward agree
    rows = [json.loads(line) for line in (tmp_path / 'samples' / 'rollouts-rank0.jsonl').read_text().splitlines()]
    assert {r['policy'] for r in rows} == {'student', 'dataset'} and len(rows) == 4 * 8
    assert all(math.isfinite(float(v)) for _, v in memory.data['loss/train/total'])
    trainer.close()

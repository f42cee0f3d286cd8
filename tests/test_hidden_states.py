"""Hidden-state distillation: the term against a plain-PyTorch reference (value and gradient, every loss), the pair
mapping, the taps through activation checkpointing, one optimizer step for every microbatch split and with the fused
head, resume and export (the projections checkpointed, left out of the student), the config's refusals, and 1 vs 2
processes under FSDP2 (``launcher``)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from composer import Trainer
from helpers import assert_cli_error, tiny_gpt2
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from composer_kd import DistillationModel, token_data_spec
from composer_kd.cli import main
from composer_kd.config.model_schema import HIDDEN_STATE_LOSSES as SCHEMA_LOSSES
from composer_kd.config.paths import LocalPaths
from composer_kd.config.run_config import load_config
from composer_kd.data.tokens import collate_tokens
from composer_kd.errors import ConfigError
from composer_kd.losses import distillation_loss
from composer_kd.losses.hidden_states import HIDDEN_STATE_LOSSES, hidden_state_loss, hidden_state_sums
from composer_kd.model.hidden_state_taps import HiddenStateDistillation, resolve_pairs, uniform_pairs
from composer_kd.run.export import load_checkpoint
from composer_kd.run.train import check_run_config

B, T, H = 3, 7, 5
LOSSES = sorted(HIDDEN_STATE_LOSSES)


def _labels() -> torch.Tensor:
    labels = torch.randint(0, 9, (B, T), generator=torch.Generator().manual_seed(3))
    labels[0, :3] = -100  # a masked prefix
    labels[2, -3:] = -100  # and a masked suffix
    return labels


def _states(seed: int, pairs: int = 2, grad: bool = False) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, T, H, generator=g, dtype=torch.float64).requires_grad_(grad) for _ in range(pairs)]


def _reference(students: list[torch.Tensor], teachers: list[torch.Tensor], labels: torch.Tensor,
               loss: str) -> torch.Tensor:
    """Token by token, with torch's own functions: the mean over the scored tokens (t scored if labels[t+1] is), then
    over the pairs."""
    per_pair = []
    for s, t in zip(students, teachers):
        terms = []
        for b in range(s.shape[0]):
            for i in range(s.shape[1] - 1):
                if labels[b, i + 1] == -100:
                    continue
                if loss == 'cosine':
                    terms.append(1 - F.cosine_similarity(s[b, i], t[b, i], dim=0))
                elif loss == 'mse':
                    terms.append(F.mse_loss(s[b, i], t[b, i]))
                else:
                    terms.append(F.mse_loss(s[b, i], t[b, i], reduction='sum') / (t[b, i].pow(2).sum() + t.shape[-1] * 1e-6))
        per_pair.append(torch.stack(terms).mean())
    return torch.stack(per_pair).mean()


def test_the_schema_names_every_loss() -> None:
    assert sorted(SCHEMA_LOSSES) == LOSSES


@pytest.mark.parametrize('loss', LOSSES)
def test_the_term_equals_a_plain_pytorch_reference(loss: str) -> None:
    students, teachers, labels = _states(1, grad=True), _states(2), _labels()
    got = hidden_state_loss(students, teachers, labels, loss=loss)
    want = _reference(students, teachers, labels, loss)
    assert got.dtype == torch.float64 and abs(float(got - want)) <= 1e-12
    grads_got = torch.autograd.grad(got * 3.0, students)
    grads_want = torch.autograd.grad(want * 3.0, students)
    for a, b in zip(grads_got, grads_want):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-13)
        assert a[0, :2].abs().sum() == 0 and a[:, -1].abs().sum() == 0  # unscored positions take no gradient


def test_sums_of_parts_add_up_to_the_whole_and_nothing_scored_is_zero() -> None:
    students, teachers, labels = _states(1, grad=True), _states(2), _labels()
    whole = hidden_state_loss(students, teachers, labels, loss='normalized_mse')
    parts = [hidden_state_sums([s[rows] for s in students], [t[rows] for t in teachers], labels[rows],
                               loss='normalized_mse') for rows in (slice(0, 1), slice(1, 3))]
    assert torch.allclose(sum(p[0] for p in parts) / sum(p[1] for p in parts), whole, rtol=1e-12)
    empty = hidden_state_loss(students, teachers, torch.full_like(labels, -100))
    assert float(empty) == 0.0
    assert torch.autograd.grad(empty, students[0])[0].abs().sum() == 0


def test_mismatched_sequence_layouts_are_refused() -> None:
    students, teachers, labels = _states(1), _states(2), _labels()
    with pytest.raises(ValueError, match='do not lay out the sequence'):
        hidden_state_loss(students, [t.transpose(0, 1).contiguous() for t in teachers], labels)
    with pytest.raises(ValueError, match='project the student'):
        hidden_state_loss(students, [t[..., :3] for t in teachers], labels)


def test_uniform_pairs_and_explicit_pairs() -> None:
    # round((i+1)·30/4) − 1 with halves up: 7.5 → 8, 15, 22.5 → 23, 30
    assert uniform_pairs(4, 30) == [(0, 7), (1, 14), (2, 22), (3, 29)]
    assert uniform_pairs(3, 12) == [(0, 3), (1, 7), (2, 11)]
    assert uniform_pairs(5, 5) == [(i, i) for i in range(5)]
    assert resolve_pairs('uniform', 3, 30, kept=[0, 10, 29]) == [(0, 0), (1, 10), (2, 29)]
    assert resolve_pairs([[0, 5], [1, 2]], 2, 6) == [(0, 5), (1, 2)]
    with pytest.raises(ValueError, match=r'pair \[2, 1\] is out of range: the student has 2 blocks'):
        resolve_pairs([[2, 1]], 2, 6)


# -- the model --------------------------------------------------------------------------------------------------
def _batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 48, (3, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    return {'input_ids': ids, 'attention_mask': mask, 'labels': torch.where(mask.bool(), ids, -100)}


def test_the_models_term_uses_the_paired_blocks_and_their_projections() -> None:
    """``DistillationModel``'s 'hidden' and gradients against the states of ``output_hidden_states`` (entry i + 1 is
    block i's output for all blocks but the last) projected by hand."""
    student, teacher = tiny_gpt2(n_layer=3, seed=1, dtype=torch.float64), tiny_gpt2(n_layer=4, n_embd=24, seed=2,
                                                                                     dtype=torch.float64)
    taps = HiddenStateDistillation(student, teacher, pairs=[[0, 1], [1, 2], [1, 0]], loss='mse', weight=0.7)
    model = DistillationModel(student, teacher, alpha=0.4, hidden_states=taps).train()
    batch = _batch()
    losses = model.loss(model(batch), batch)
    (losses['total'] * 2.0).backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert sorted(n for n in got if not n.startswith('model.')) == [f'hidden_states.projections.{i}.weight'
                                                                     for i in range(3)]
    model.zero_grad()
    inputs = {'input_ids': batch['input_ids'], 'attention_mask': batch['attention_mask']}
    s_out = student(**inputs, output_hidden_states=True)
    with torch.no_grad():
        t_out = teacher(**inputs, output_hidden_states=True)
    projected = [F.linear(s_out.hidden_states[s + 1], taps.projections[i].weight)
                 for i, (s, _) in enumerate(taps.pairs)]
    hidden = _reference(projected, [t_out.hidden_states[t + 1] for _, t in taps.pairs], batch['labels'], 'mse')
    logits = distillation_loss(s_out.logits, t_out.logits, batch['labels'], alpha=0.4)
    assert abs(float(losses['hidden'] - hidden)) <= 1e-12 and abs(float(losses['kd'] - logits['kd'])) <= 1e-12
    assert abs(float(losses['total'] - (logits['total'] + 0.7 * hidden))) <= 1e-12
    ((logits['total'] + 0.7 * hidden) * 2.0).backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert torch.allclose(got[name], p.grad, rtol=1e-9, atol=1e-12), name
    assert 'hidden' not in model.loss(model.eval()(batch), batch)  # evaluation computes no hidden-state term


def test_the_taps_see_through_activation_checkpointing() -> None:
    """Composer checkpoints the student's blocks after the model is built (a wrapper at each block's place), Hugging
    Face's ``gradient_checkpointing_enable`` inside each block's call: either way the kept state must be the one
    autograd differentiates (a reentrant checkpoint runs the block without gradients; its output gets them when the
    checkpoint returns), so the gradients are the plain model's."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        apply_activation_checkpointing,
        checkpoint_wrapper,
    )
    grads = {}
    for kind in ('plain', 'composer', 'hugging_face'):
        student, teacher = tiny_gpt2(n_layer=2, seed=1, dtype=torch.float64), tiny_gpt2(n_layer=2, seed=2,
                                                                                         dtype=torch.float64)
        model = DistillationModel(student, teacher, alpha=1.0,
                                  hidden_states=HiddenStateDistillation(student, teacher)).train()
        if kind == 'composer':  # as Composer's activation_checkpointing does, after the model is built
            wrapper = lambda m: checkpoint_wrapper(m, checkpoint_impl=CheckpointImpl.REENTRANT)  # noqa: E731
            apply_activation_checkpointing(student, checkpoint_wrapper_fn=wrapper,
                                           check_fn=lambda m: type(m).__name__ == 'GPT2Block')
        elif kind == 'hugging_face':
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': True})
        batch = _batch()
        losses = model.loss(model(batch), batch)
        losses['total'].backward()
        grads[kind] = {n.replace('_checkpoint_wrapped_module.', ''): p.grad for n, p in student.named_parameters()}
        assert float(losses['hidden']) > 0
    for kind in ('composer', 'hugging_face'):
        for name, grad in grads['plain'].items():
            assert torch.allclose(grads[kind][name], grad, rtol=1e-10, atol=1e-14), (kind, name)


@pytest.mark.parametrize('teacher_width', [24, 16])
def test_composer_fsdp1_wrapping_with_activation_checkpointing_gives_the_same_term(teacher_width: int) -> None:
    """Composer's FSDP1 path (on CPU, ``fsdp1_on_cpu``), its blocks activation-checkpointed: the projections an FSDP1
    root of their own (none at equal widths: a root without parameters), the same loss and gradients."""
    from composer.distributed.dist_strategy import prepare_fsdp_module
    from composer.utils import FSDPConfig, dist
    from fsdp1_on_cpu import fsdp1_on_cpu
    results = []
    for wrapped in (False, True):
        student = tiny_gpt2(n_layer=2, seed=1)
        teacher = tiny_gpt2(n_layer=3, n_embd=teacher_width, seed=2)
        model = DistillationModel(student, teacher, alpha=0.5, hidden_states=HiddenStateDistillation(
            student, teacher, loss='cosine', projection='auto')).train()
        if wrapped:
            dist.initialize_dist('cpu')  # one process: a gloo group of one
            with fsdp1_on_cpu():
                prepare_fsdp_module(model, None, FSDPConfig(activation_checkpointing=True, sync_module_states=False),
                                    precision='fp32', device='cpu')
            assert type(model.hidden_states).__name__ == 'FullyShardedDataParallel'
        batch = _batch()
        losses = model.loss(model(batch), batch)
        losses['total'].backward()
        grads = {n.replace('_fsdp_wrapped_module.', '').replace('_checkpoint_wrapped_module.', ''): p.grad.clone()
                 for n, p in model.named_parameters() if p.requires_grad}
        results.append((losses, grads))
    (plain, plain_grads), (fsdp, fsdp_grads) = results
    assert abs(float(plain['hidden'] - fsdp['hidden'])) <= 1e-6 and float(plain['hidden']) > 0
    assert sorted(plain_grads) == sorted(fsdp_grads)
    assert any('projections' in n for n in plain_grads) == (teacher_width != 16)
    for name, grad in plain_grads.items():
        assert torch.allclose(grad, fsdp_grads[name], rtol=1e-4, atol=1e-6), name


LENGTHS = [16, 3, 11, 7, 2, 13]  # padding differs in every microbatch split


def _one_step(microbatch: int, fused_head: bool = False, weight: float = 2.0) -> dict[str, torch.Tensor]:
    """Student and projection parameters after one SGD step of alpha·CE + (1 − alpha)·KD + weight·hidden."""
    g = torch.Generator().manual_seed(0)
    samples = [{'input_ids': torch.randint(0, 48, (n,), generator=g)} for n in LENGTHS]
    student = tiny_gpt2(n_layer=2, seed=1, dtype=torch.float64)
    teacher = tiny_gpt2(n_layer=3, n_embd=24, seed=2, dtype=torch.float64)
    taps = HiddenStateDistillation(student, teacher, loss='normalized_mse', weight=weight)
    model = DistillationModel(student, teacher, alpha=0.4, temperature=2.0, fused_head=fused_head, hidden_states=taps)
    loader = DataLoader(samples, batch_size=len(samples), collate_fn=collate_tokens)
    trainer = Trainer(model=model, train_dataloader=token_data_spec(loader),
                      optimizers=torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5),
                      max_duration='1ba', device='cpu', precision='fp32', device_train_microbatch_size=microbatch,
                      accumulate_train_batch_on_tokens=True, progress_bar=False, log_to_console=False, seed=0)
    trainer.fit()
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


def _relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], start: dict[str, torch.Tensor]) -> float:
    diff = sum(((a[k] - b[k])**2).sum() for k in a)**0.5
    update = sum(((a[k] - start[k])**2).sum() for k in a)**0.5
    assert update > 1e-3  # the step moved the parameters
    return float(diff / update)


@pytest.fixture(scope='module')
def full_batch_step() -> dict[str, torch.Tensor]:
    return _one_step(len(LENGTHS))


@pytest.mark.parametrize('microbatch,fused_head', [(1, False), (2, False), (4, False), (4, True)])
def test_one_step_is_the_same_for_every_microbatch_split(full_batch_step: dict, microbatch: int,
                                                         fused_head: bool) -> None:
    start = {k: v.detach() for k, v in _initial_parameters().items()}
    got = _one_step(microbatch, fused_head=fused_head)
    assert got.keys() == full_batch_step.keys() and 'hidden_states.projections.0.weight' in got
    assert _relative_difference(got, full_batch_step, start) <= 1e-6


def test_the_term_moves_the_step(full_batch_step: dict) -> None:
    # The control: a different weight gives a different step (the term reaches every parameter it should).
    start = _initial_parameters()
    assert _relative_difference(_one_step(len(LENGTHS), weight=0.5), full_batch_step, start) > 1e-2


def _initial_parameters() -> dict[str, torch.Tensor]:
    student = tiny_gpt2(n_layer=2, seed=1, dtype=torch.float64)
    teacher = tiny_gpt2(n_layer=3, n_embd=24, seed=2, dtype=torch.float64)
    model = DistillationModel(student, teacher, alpha=0.4,
                              hidden_states=HiddenStateDistillation(student, teacher, loss='normalized_mse'))
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


# -- config ------------------------------------------------------------------------------------------------------
HIDDEN = 'model.distillation.hidden_states'
ELSEWHERE = LocalPaths(elsewhere=True)  # the recipes' assets are not made here


@pytest.mark.parametrize('overrides,match', [
    ([f'{HIDDEN}={{loss: l2}}'], "hidden_states.loss must be one of ['cosine', 'mse', 'normalized_mse']"),
    ([f'{HIDDEN}={{pairs: []}}'], 'pairs=[] pairs nothing'),
    ([f'{HIDDEN}={{pairs: [[0, 1, 2]]}}'], "pairs must be 'uniform' or a list of [student_block, teacher_block]"),
    ([f'{HIDDEN}={{weight: 0}}'], 'hidden_states.weight must be a number > 0'),
    ([f'{HIDDEN}={{}}', 'model.teacher={precomputed: true}'], 'a precomputed teacher stores its top-k'),
    ([f'{HIDDEN}={{}}', 'model.teacher=null', 'model.distillation.alpha=1.0'], 'needs a teacher model'),
])
def test_the_config_refuses_what_cannot_work(tmp_path: Path, overrides: list[str], match: str) -> None:
    recipe = Path(__file__).resolve().parents[1] / 'yamls' / 'tiny-cpu.yaml'
    with pytest.raises(ConfigError, match=re.escape(match)):  # the schema's and the rules' errors
        check_run_config(load_config(str(recipe), overrides), world_size=1, gpu=False, paths=ELSEWHERE)


def test_an_ensemble_is_refused() -> None:
    recipe = Path(__file__).resolve().parents[1] / 'yamls' / 'tiny-cpu-ensemble.yaml'
    with pytest.raises(ConfigError, match='compares the student with one teacher; this run has an ensemble'):
        check_run_config(load_config(str(recipe), [f'{HIDDEN}={{}}']), world_size=1, gpu=False, paths=ELSEWHERE)


@pytest.mark.parametrize('setting,match', [
    ('{pairs: [[0, 5]]}', 'model.distillation.hidden_states: pair [0, 5] is out of range: the student has 1 '
     'blocks (0-0), the teacher 2 (0-1)'),
    ('{projection: none}', 'projection: none needs equal widths; the student\'s is 32, the teacher\'s 64'),
])
def test_blocks_and_widths_are_checked_when_the_models_are_built(capsys: pytest.CaptureFixture, write_config,
                                                                 setting: str, match: str) -> None:
    config = write_config()
    assert_cli_error(capsys, ['train', str(config), f'{HIDDEN}={setting}'], match)


# -- a run: resume restores the projections, export leaves them out --------------------------------------------
def _run(write_config, tmp_path: Path, name: str, **edits) -> dict[int, dict[str, float]]:
    log = tmp_path / f'{name}.txt'
    config = write_config(**{HIDDEN: {'loss': 'cosine', 'weight': 0.5}, 'eval_loader': None, 'callbacks': None,
                             'max_duration': '4ba', 'save_interval': '2ba', 'save_num_checkpoints_to_keep': -1,
                             'optimizer.lr': 0.02, 'scheduler.t_warmup': '0ba',
                             'run_name': 'hidden', 'log_to_console': False,
                             'loggers': {'file': {'filename': str(log), 'flush_interval': 1}}, **edits})
    assert main(['train', str(config)]) == 0
    found = re.findall(r'\[batch=(\d+)\]: loss/train/(total|hidden): ([0-9.]+)', log.read_text())
    values: dict[int, dict[str, float]] = {}
    for batch, key, value in found:
        values.setdefault(int(batch), {})[key] = float(value)
    return values


def test_resume_restores_the_projections_and_export_leaves_them_out(tmp_path: Path, write_config) -> None:
    whole = _run(write_config, tmp_path, 'whole')
    assert sorted(whole) == [0, 1, 2, 3] and all(v['hidden'] > 0 for v in whole.values())
    checkpoints = tmp_path / 'runs' / 'hidden' / 'checkpoints'
    first, last = (load_checkpoint(str(checkpoints / f'ep0-ba{n}-rank0.pt'))['state']['model'] for n in (2, 4))
    key = 'hidden_states.projections.0.weight'
    assert first[key].shape == (64, 32) and not torch.equal(first[key], last[key])  # trained and checkpointed
    # Resumed from batch 2 in a new process state: batches 3 and 4 as in the uninterrupted run, same projections.
    (tmp_path / 'resumed').mkdir()
    resumed = _run(write_config, tmp_path / 'resumed', 'resumed', load_path=str(checkpoints / 'ep0-ba2-rank0.pt'),
                   save_folder=str(tmp_path / 'resumed' / 'checkpoints'))
    assert sorted(resumed) == [2, 3]
    for batch in (2, 3):
        assert resumed[batch] == pytest.approx(whole[batch], abs=1e-4), batch
    again = load_checkpoint(str(tmp_path / 'resumed' / 'checkpoints' / 'ep0-ba4-rank0.pt'))['state']['model']
    assert torch.allclose(again[key], last[key], atol=1e-6)
    # export: the student alone, a plain Hugging Face folder.
    assert main(['export', str(checkpoints / 'ep0-ba4-rank0.pt'), str(tmp_path / 'student')]) == 0
    exported = load_file(tmp_path / 'student' / 'model.safetensors')
    assert not [k for k in exported if 'projection' in k or k.startswith('hidden_states')]
    assert set(exported) == {k[len('model.'):] for k in last if k.startswith('model.')} - {'lm_head.weight'}


# -- 2 processes -------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.launcher
def test_two_processes_sharded_match_one(tmp_path: Path, write_config) -> None:
    """FSDP2 on 2 processes (the projections an FSDP root of their own, sharded, in the optimizer, checkpointed
    sharded) against 1 process: the same losses, hidden term included, and the same projections after 4 steps."""
    config = write_config(**{HIDDEN: {'loss': 'normalized_mse'}, 'eval_loader': None, 'callbacks': None,
                             'max_duration': '4ba', 'save_interval': '4ba', 'optimizer.lr': 0.02,
                             'scheduler.t_warmup': '0ba', 'log_to_console': False})
    logs = {n: tmp_path / f"log{n}.txt" for n in (1, 2)}
    assert main(['train', str(config), f'save_folder={tmp_path / "n1"}',
                 f'loggers={{file: {{filename: {logs[1]}, flush_interval: 1}}}}']) == 0  # 1 process: here
    launcher = [sys.executable, '-m', 'composer.cli.launcher', '-n', '2', '--stdout', str(tmp_path / 'rank{rank}.out'),
                '--stderr', str(tmp_path / 'rank{rank}.err'), '-m', 'composer_kd']
    proc = subprocess.run([*launcher, 'train', str(config), f'save_folder={tmp_path / "n2"}',
                           f'loggers={{file: {{filename: {logs[2]}, flush_interval: 1}}}}',
                           'fsdp_config={state_dict_type: sharded}'], capture_output=True, text=True, timeout=600,
                          env={**os.environ, 'FSDP_VERSION': '2'})
    errors = ''.join(p.read_text()[-3000:] for p in tmp_path.glob('rank*.err'))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + errors
    states = {n: load_checkpoint(str(tmp_path / f'n{n}' / name))['state']['model']
              for n, name in ((1, 'ep0-ba4-rank0.pt'), (2, 'ep0-ba4'))}
    for name in ('total', 'hidden'):
        one, two = ({int(b): float(v) for b, v in re.findall(rf'\[batch=(\d+)\]: loss/train/{name}: ([0-9.]+)',
                                                             logs[n].read_text())} for n in (1, 2))
        assert sorted(one) == sorted(two) == [0, 1, 2, 3], name
        assert max(abs(one[b] - two[b]) for b in one) <= 2e-3, (name, one, two)
    key = 'hidden_states.projections.0.weight'
    start = HiddenStateDistillation(tiny_gpt2(n_embd=32), tiny_gpt2(n_layer=2, n_embd=64)).projections[0].weight
    moved = float((states[1][key] - start).abs().max())
    assert moved > 1e-3 and float((states[2][key] - states[1][key]).abs().max()) <= 1e-2 * moved

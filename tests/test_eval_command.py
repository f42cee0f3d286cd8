"""``composer-kd eval``: its numbers against a plain PyTorch computation over the same samples (every divergence
setting train takes: ``beta``, ``lam``, the temperature), the teacher loaded once for all students, flags and
YAML, and bad settings refused by name before any model loads (as ``train`` refuses them)."""

import json
import shutil
from pathlib import Path
from typing import Callable, Optional

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_cli_error
from streaming import StreamingDataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from composer_kd.cli import main


def _kl(a_log: torch.Tensor, b_log: torch.Tensor) -> torch.Tensor:
    return (a_log.exp() * (a_log - b_log)).sum(-1)


def _mix(p_log: torch.Tensor, q_log: torch.Tensor, weight_p: float) -> torch.Tensor:
    return (weight_p * p_log.exp() + (1 - weight_p) * q_log.exp()).log()


# Divergence D(p‖q) of teacher p and student q, written out from their definitions.
DIVERGENCES: dict[str, Callable[..., torch.Tensor]] = {
    'forward_kl': lambda p, q: _kl(p, q),
    'jsd': lambda p, q, beta: beta * _kl(p, _mix(p, q, beta)) + (1 - beta) * _kl(q, _mix(p, q, beta)),
    'skew_reverse_kl': lambda p, q, lam: _kl(q, _mix(p, q, 1 - lam)),
}


def _reference(model_dir: Path, teacher_dir: Path, data: Path, samples: int, divergence: str = 'forward_kl',
               temperature: float = 1.0, **kwargs: float) -> dict[str, float]:
    """CE, perplexity, the divergence at ``temperature`` and top-1 agreement over every scored position, sample by
    sample."""
    student = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    dataset = StreamingDataset(local=str(data), split='val', shuffle=False, batch_size=1)
    ce = kd = agree = count = 0.0
    with torch.no_grad():
        for i in range(samples):
            ids = torch.as_tensor(dataset[i]['tokens'], dtype=torch.long)[None]
            s = student(ids).logits[0, :-1].double()
            v = s.shape[-1]
            t = teacher(ids).logits[0, :-1, :v].double()
            target = ids[0, 1:]
            ce += F.cross_entropy(s, target, reduction='sum').item()
            p, q = (x.div(temperature).log_softmax(-1) for x in (t, s))
            kd += DIVERGENCES[divergence](p, q, **kwargs).sum().item()
            agree += (s.argmax(-1) == t.argmax(-1)).sum().item()
            count += len(target)
    return {'LanguageCrossEntropy': ce / count, 'LanguagePerplexity': float(torch.tensor(ce / count).exp()),
            'TeacherDivergenceLoss': kd / count, 'TeacherTop1Agreement': agree / count}


def _count_loads(monkeypatch: pytest.MonkeyPatch, fail: bool = False) -> list[str]:
    """The folders ``AutoModelForCausalLM.from_pretrained`` loads from now on (with ``fail``: none may load)."""
    loads: list[str] = []
    original = AutoModelForCausalLM.from_pretrained

    def counted(folder: str, *args: object, **kwargs: object) -> object:
        assert not fail, f'a model loaded: {folder}'
        loads.append(str(folder))
        return original(folder, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, 'from_pretrained', counted)
    return loads


def test_eval_matches_a_plain_computation(capsys, monkeypatch, tiny_assets: Path, tmp_path: Path) -> None:
    """Two students against one teacher, which loads once."""
    models = [str(tiny_assets / 'student'), str(tiny_assets / 'teacher_b')]
    config = tmp_path / 'eval.yaml'
    config.write_text(f'models: {json.dumps(models)}\ndata: {tiny_assets / "data"}\nmax_seq_len: 128\n'
                      f'tokenizer: {tiny_assets / "tokenizer"}\nbatch_size: 8\n')
    loads = _count_loads(monkeypatch)
    assert main(['eval', '--config', str(config), '--teacher', str(tiny_assets / 'teacher'), '--max-samples',
                 '16']) == 0
    assert sorted(loads) == sorted([*models, str(tiny_assets / 'teacher')])  # each folder once
    results = json.loads(capsys.readouterr().out)
    assert list(results) == models
    for model in models:
        want = _reference(Path(model), tiny_assets / 'teacher', tiny_assets / 'data', 16)
        assert results[model] == pytest.approx(want, rel=1e-4), model


@pytest.mark.parametrize('divergence,flags,kwargs', [('jsd', ['--beta', '0.3'], {'beta': 0.3}),
                                                     ('jsd', [], {'beta': 0.5}),
                                                     ('skew_reverse_kl', ['--lam', '0.2'], {'lam': 0.2})])
def test_divergence_settings_reach_the_metric(capsys, tiny_assets: Path, divergence: str, flags: list[str],
                                              kwargs: dict[str, float]) -> None:
    """``beta`` and ``lam`` (default when not given) at a temperature of 2, as train's model.distillation takes
    them."""
    model = str(tiny_assets / 'student')
    assert main(['eval', '--models', model, '--data', str(tiny_assets / 'data'), '--max-seq-len', '128',
                 '--tokenizer', str(tiny_assets / 'tokenizer'), '--teacher', str(tiny_assets / 'teacher'),
                 '--batch-size', '4', '--max-samples', '4', '--divergence', divergence, '--temperature', '2',
                 *flags]) == 0
    got = json.loads(capsys.readouterr().out)[model]['TeacherDivergenceLoss']
    want = _reference(Path(model), tiny_assets / 'teacher', tiny_assets / 'data', 4, divergence, 2.0, **kwargs)
    # These nearly uniform models are ~1e-3 apart: float32 log-probs (~7) leave ~1e-3 of that relative; beta 0.3
    # and 0.5 differ by ~16%, lam 0.1 and 0.2 by ~20%.
    assert got == pytest.approx(want['TeacherDivergenceLoss'], rel=1e-3)


def _with_tokenizer(tiny_assets: Path, folder: Path, added: int, model: Optional[str] = None) -> Path:
    """``folder``: the tiny tokenizer with ``added`` new tokens (ids 1024, ...), and a copy of ``model`` if given."""
    if model is not None:
        shutil.copytree(tiny_assets / model, folder)
    tokenizer = AutoTokenizer.from_pretrained(tiny_assets / 'tokenizer')
    tokenizer.add_tokens([f'<extra{i}>' for i in range(added)])
    tokenizer.save_pretrained(folder)
    return folder


def test_eval_refuses_bad_settings_before_loading(capsys, monkeypatch, tiny_assets: Path, tmp_path: Path) -> None:
    _count_loads(monkeypatch, fail=True)
    base = ['eval', '--models', str(tiny_assets / 'student'), '--data', str(tiny_assets / 'data')]
    assert_cli_error(capsys, base, 'max_seq_len must be an integer >= 2, got None')
    base += ['--max-seq-len', '64']
    assert_cli_error(capsys, [*base, '--split', 'test'], "no MDS split 'test'")
    assert_cli_error(capsys, [*base, '--teacher', str(tmp_path / 'none')], 'teacher: ')
    assert_cli_error(capsys, [*base, '--divergence', 'bogus'], 'divergence')
    (tmp_path / 'bad.yaml').write_text('modles: [x]\n')
    assert_cli_error(capsys, ['eval', '--config', str(tmp_path / 'bad.yaml')], "unknown key 'modles'")
    # What train refuses in model.distillation.
    assert_cli_error(capsys, [*base, '--beta', '0.3'], "divergence 'forward_kl' takes no argument 'beta'")
    assert_cli_error(capsys, [*base, '--divergence', 'jsd', '--beta', '2'], "beta must be a number in [0.0, 1.0]")
    assert_cli_error(capsys, [*base, '--divergence', 'skew_kl', '--lam', '-1'], 'lam must be a number in')
    assert_cli_error(capsys, [*base, '--temperature', '0'], 'temperature must be a number > 0, got 0.0')
    if not torch.cuda.is_available():
        assert_cli_error(capsys, [*base, '--precision', 'amp_bf16'], "precision='amp_bf16' needs a GPU; this "
                         'machine has none, use precision: fp32')
    assert_cli_error(capsys, [*base, '--precision', 'bf16'], "precision='bf16': use one of")


def test_eval_refuses_another_vocabulary(capsys, monkeypatch, tiny_assets: Path, tmp_path: Path) -> None:
    """A model folder whose tokenizer maps tokens to other ids, and a tokenizer longer than a model's output
    logits, are refused before any model loads (train's vocabulary checks)."""
    _count_loads(monkeypatch, fail=True)
    other = _with_tokenizer(tiny_assets, tmp_path / 'other-student', 1, model='student')
    base = ['eval', '--data', str(tiny_assets / 'data'), '--max-seq-len', '64']
    assert_cli_error(capsys, [*base, '--models', str(tiny_assets / 'student'), str(other), '--tokenizer',
                              str(tiny_assets / 'tokenizer')], "models.1: the models.1 tokenizer maps token '<extra0>' "
                     'to id 1024 but the run tokenizer maps it to None')
    longer = _with_tokenizer(tiny_assets, tmp_path / 'longer', 8)
    assert_cli_error(capsys, [*base, '--models', str(tiny_assets / 'student'), '--tokenizer', str(longer)],
                     'models.0: ' + str(tiny_assets / 'student') + ' has 1024 output logits but the tokenizer has 1032')
    other_teacher = _with_tokenizer(tiny_assets, tmp_path / 'other-teacher', 1, model='teacher')
    assert_cli_error(capsys, [*base, '--models', str(tiny_assets / 'student'), '--teacher', str(other_teacher),
                              '--tokenizer', str(tiny_assets / 'tokenizer')],
                     "teacher: the teacher tokenizer maps token '<extra0>' to id 1024 but the run tokenizer maps it "
                     'to None')

"""``composer-kd eval``: its numbers against a plain PyTorch computation over the same samples, flags and YAML,
and bad settings refused by name before any model loads."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_cli_error
from streaming import StreamingDataset
from transformers import AutoModelForCausalLM

from composer_kd.cli import main


def _reference(model_dir: Path, teacher_dir: Path, data: Path, samples: int) -> dict[str, float]:
    """CE, perplexity, forward KL(teacher‖student) and top-1 agreement over every scored position, sample by sample."""
    student = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    dataset = StreamingDataset(local=str(data), split='val', shuffle=False, batch_size=1)
    ce = kl = agree = count = 0.0
    with torch.no_grad():
        for i in range(samples):
            ids = torch.as_tensor(dataset[i]['tokens'], dtype=torch.long)[None]
            s = student(ids).logits[0, :-1].double()
            v = s.shape[-1]
            t = teacher(ids).logits[0, :-1, :v].double()
            target = ids[0, 1:]
            ce += F.cross_entropy(s, target, reduction='sum').item()
            kl += (t.softmax(-1) * (t.log_softmax(-1) - s.log_softmax(-1))).sum().item()
            agree += (s.argmax(-1) == t.argmax(-1)).sum().item()
            count += len(target)
    return {'LanguageCrossEntropy': ce / count, 'LanguagePerplexity': float(torch.tensor(ce / count).exp()),
            'TeacherDivergenceLoss': kl / count, 'TeacherTop1Agreement': agree / count}


def test_eval_matches_a_plain_computation(capsys, tiny_assets: Path, tmp_path: Path) -> None:
    models = [str(tiny_assets / 'student'), str(tiny_assets / 'teacher_b')]
    config = tmp_path / 'eval.yaml'
    config.write_text(f'models: {json.dumps(models)}\ndata: {tiny_assets / "data"}\nmax_seq_len: 128\n'
                      f'tokenizer: {tiny_assets / "tokenizer"}\nbatch_size: 8\n')
    assert main(['eval', '--config', str(config), '--teacher', str(tiny_assets / 'teacher'), '--max-samples',
                 '16']) == 0
    results = json.loads(capsys.readouterr().out)
    assert list(results) == models
    for model in models:
        want = _reference(Path(model), tiny_assets / 'teacher', tiny_assets / 'data', 16)
        assert results[model] == pytest.approx(want, rel=1e-4), model


def test_eval_refuses_bad_settings_before_loading(capsys, tiny_assets: Path, tmp_path: Path) -> None:
    base = ['eval', '--models', str(tiny_assets / 'student'), '--data', str(tiny_assets / 'data')]
    assert_cli_error(capsys, base, 'max_seq_len must be an integer >= 2, got None')
    assert_cli_error(capsys, [*base, '--max-seq-len', '64', '--split', 'test'], "no MDS split 'test'")
    assert_cli_error(capsys, [*base, '--max-seq-len', '64', '--teacher', str(tmp_path / 'none')], 'teacher: ')
    assert_cli_error(capsys, [*base, '--max-seq-len', '64', '--divergence', 'bogus'], 'divergence')
    (tmp_path / 'bad.yaml').write_text('modles: [x]\n')
    assert_cli_error(capsys, ['eval', '--config', str(tmp_path / 'bad.yaml')], "unknown key 'modles'")

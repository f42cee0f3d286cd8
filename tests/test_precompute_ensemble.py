"""``precompute-teacher`` with ``model.teachers``: the stored top-k is the ensemble's (against the two teachers run
directly and mixed by hand), it trains offline, and what cannot be stored exactly is refused."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import assert_cli_error
from omegaconf import OmegaConf
from streaming import StreamingDataset
from transformers import AutoModelForCausalLM

from composer_kd.cli import main
from composer_kd.data.teacher_topk import decode_teacher, pad_teacher, topk_teacher_from_batch

REPO = Path(__file__).resolve().parents[1]


def _config(tmp_path: Path, tiny_assets: Path, out: str, mode: str, temperatures: list[float]) -> Path:
    cfg = OmegaConf.load(REPO / 'yamls' / 'tiny-cpu-precompute.yaml')
    cfg.variables.assets = str(tiny_assets)
    del cfg.model.teacher
    cfg.model.teachers = [{'pretrained_model_name_or_path': str(tiny_assets / 'teacher'), 'weight': 0.7},
                          {'pretrained_model_name_or_path': str(tiny_assets / 'teacher_b'), 'weight': 0.3}]
    cfg.model.distillation = {'ensemble': mode}
    cfg.precompute.update({'logprobs': 'float16', 'temperatures': temperatures, 'progress_bar': False})
    cfg.precompute.dataset.split = 'val'
    cfg.precompute.out.local = str(tmp_path / out)
    path = tmp_path / f'{out}.yaml'
    OmegaConf.save(cfg, path)
    return path


def _teacher_logits(tiny_assets: Path, tokens: np.ndarray) -> list[torch.Tensor]:
    ids = torch.from_numpy(tokens.astype(np.int64))[None]
    with torch.no_grad():
        return [AutoModelForCausalLM.from_pretrained(tiny_assets / name).eval()(ids).logits[0, :, :1024].double()
                for name in ('teacher', 'teacher_b')]


@pytest.mark.slow
@pytest.mark.parametrize('mode,temperature', [('probs', 1.0), ('logits', 2.0)])
def test_the_stored_top_k_is_the_ensembles(tmp_path: Path, tiny_assets: Path, mode: str, temperature: float) -> None:
    assert main(['precompute-teacher', str(_config(tmp_path, tiny_assets, 'out', mode, [1.0, temperature]))]) == 0
    split = tmp_path / 'out' / 'val'
    meta = json.loads((split / 'teacher_topk.json').read_text())
    assert meta['teacher']['ensemble'] == mode and meta['teacher']['weights'] == [0.7, 0.3]
    assert [m['source'] for m in meta['teacher']['members']] == [str(tiny_assets / n) for n in ('teacher', 'teacher_b')]
    assert meta['teacher']['fingerprint'] and meta['teacher']['source'].startswith(f'ensemble ({mode}) of ')

    stored = StreamingDataset(local=str(split), shuffle=False, batch_size=1)
    for i in (0, 389):
        sample = stored[i]
        a, b = _teacher_logits(tiny_assets, sample['tokens'])
        if mode == 'probs':  # the mixture, by hand
            log_p = (0.7 * torch.softmax(a, -1) + 0.3 * torch.softmax(b, -1)).log()
            tempered = log_p
        else:  # one teacher with averaged logits, at every temperature
            log_p = torch.log_softmax(0.7 * a + 0.3 * b, -1)
            tempered = torch.log_softmax((0.7 * a + 0.3 * b) / temperature, -1)
        ids, logprobs, rest = (t[0] for t in topk_teacher_from_batch(
            pad_teacher([decode_teacher(sample, 128, temperature)], len(sample['tokens']))))
        ids = ids.long()
        assert (log_p.gather(1, ids).min(-1).values >= log_p.topk(32, -1).values[:, -1] - 1e-5).all()
        assert torch.allclose(logprobs.double().exp(), log_p.gather(1, ids).exp(), rtol=1e-2, atol=1e-6)
        outside = torch.ones_like(log_p, dtype=torch.bool).scatter_(1, ids, False)
        want_rest = tempered.masked_fill(~outside, float('-inf')).logsumexp(-1)
        assert torch.allclose(rest.double(), want_rest, atol=2e-3, rtol=1e-3)


@pytest.mark.slow
def test_an_offline_ensemble_trains_and_its_eval_data_must_be_the_same_ensemble(capsys, tmp_path: Path,
                                                                               tiny_assets: Path) -> None:
    assert main(['precompute-teacher', str(_config(tmp_path, tiny_assets, 'ensemble', 'probs', [1.0]))]) == 0
    single = OmegaConf.load(REPO / 'yamls' / 'tiny-cpu-precompute.yaml')
    single.variables.assets = str(tiny_assets)
    single.precompute.update({'progress_bar': False, 'out': {'local': str(tmp_path / 'single')}})
    single.precompute.dataset.split = 'val'
    OmegaConf.save(single, tmp_path / 'single.yaml')
    assert main(['precompute-teacher', str(tmp_path / 'single.yaml')]) == 0

    train = OmegaConf.load(REPO / 'yamls' / 'tiny-cpu-offline.yaml')
    train.variables.assets = str(tiny_assets)
    train.variables.topk = str(tmp_path / 'ensemble')
    train.train_loader.dataset.split = 'val'
    train.update({'max_duration': '2ba', 'save_folder': None, 'eval_subset_num_batches': 1})
    train.eval_loader.dataset.local = str(tmp_path / 'ensemble')
    OmegaConf.save(train, tmp_path / 'train.yaml')
    capsys.readouterr()
    assert main(['train', str(tmp_path / 'train.yaml'), 'eval_interval=2ba']) == 0
    assert 'metrics/eval/TeacherDivergenceLoss' in capsys.readouterr().err  # Composer's console log
    other_eval = f'eval_loader.dataset.local={tmp_path / "single"}'
    assert_cli_error(capsys, ['train', str(tmp_path / 'train.yaml'), other_eval], 'is not the one at')


@pytest.mark.parametrize('mode,temperatures,edit,match', [
    ('probs', [1.0, 2.0], None, 'an ensemble with ensemble: probs is stored at temperature 1 only'),
    ('logits', [1.0], 'model.teachers.1.weight=-1', 'model.teachers.1.weight must be a positive number, got -1'),
    ('logits', [1.0], 'model.teachers.0.wieght=1', 'unknown key model.teachers.0.wieght'),
    ('mean', [1.0], None, "model.distillation.ensemble='mean'"),
    ('probs', [1.0], 'model.teachers.1.pretrained_model_name_or_path=/no/such', "folder '/no/such' does not exist"),
    ('probs', [1.0], 'model.distillation.alpha=0.5', 'unknown key model.distillation.alpha'),
])
def test_bad_ensembles_are_refused(capsys, tmp_path: Path, tiny_assets: Path, mode, temperatures, edit, match) -> None:
    config = _config(tmp_path, tiny_assets, 'out', mode, temperatures)
    assert_cli_error(capsys, ['precompute-teacher', str(config), *([edit] if edit else [])], match)
    assert not (tmp_path / 'out').exists()

"""Training from a precomputed teacher: no teacher model loaded (its folder deleted), teacher metrics on
precomputed eval data and skipped on plain data, the loss equal to online distillation at K = V, and every
refusal before training."""

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import assert_cli_error, edit_config
from omegaconf import OmegaConf
from streaming import MDSWriter, StreamingDataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from composer_kd import DistillationModel
from composer_kd.cli import main
from composer_kd.data import build_token_dataloader
from composer_kd.quickstart.tiny_assets import train_bpe_tokenizer
from composer_kd.config.run_config import load_config
from composer_kd.run.train import train

REPO = Path(__file__).resolve().parents[1]


def _precompute(tmp: Path, teacher: Path, assets: Path, data: Path, out: Path, **edits: object) -> Path:
    cfg = OmegaConf.load(REPO / 'yamls' / 'tiny-cpu-precompute.yaml')
    cfg.variables.assets = str(assets)
    cfg.model.teacher.pretrained_model_name_or_path = str(teacher)
    cfg.precompute.dataset.local = str(data)
    cfg.precompute.dataset.split = 'val'
    cfg.precompute.out.local = str(out)
    cfg.precompute.progress_bar = False
    for key, value in edits.items():
        OmegaConf.update(cfg, key, value)
    path = tmp / f'precompute-{out.name}.yaml'
    OmegaConf.save(cfg, path)
    assert main(['precompute-teacher', str(path)]) == 0
    return out


@pytest.fixture(scope='module')
def topk(tmp_path_factory: pytest.TempPathFactory, tiny_assets: Path) -> Path:
    """The tiny val split precomputed (k=32, uint8, temperatures 1 and 2) by a copy of the teacher that is then
    deleted: every test here trains without it."""
    tmp = tmp_path_factory.mktemp('topk')
    teacher = tmp / 'teacher'
    shutil.copytree(tiny_assets / 'teacher', teacher)
    out = _precompute(tmp, teacher, tiny_assets, tiny_assets / 'data', tmp / 'topk',
                      **{'precompute.temperatures': [1.0, 2.0]})
    shutil.rmtree(teacher)
    return out


@pytest.fixture
def offline_config(tmp_path: Path, tiny_assets: Path, topk: Path):
    """``yamls/tiny-cpu-offline.yaml`` training (and evaluating) on the precomputed val split."""

    def write(**edits: object) -> Path:
        cfg = OmegaConf.load(REPO / 'yamls' / 'tiny-cpu-offline.yaml')
        cfg.variables.assets = str(tiny_assets)
        cfg.variables.topk = str(topk)
        cfg.train_loader.dataset.split = 'val'
        cfg.eval_loader.dataset.local = str(topk)
        cfg.save_folder = str(tmp_path / 'runs' / '{run_name}' / 'checkpoints')
        cfg.max_duration = '4ba'
        cfg.eval_interval = '4ba'
        cfg.eval_subset_num_batches = 2
        cfg.log_to_console = False
        path = tmp_path / 'offline.yaml'
        OmegaConf.save(edit_config(cfg, edits), path)
        return path

    return write


def test_trains_without_the_teacher_and_reports_teacher_metrics(offline_config) -> None:
    trainer = train(load_config(str(offline_config())))
    assert trainer.state.model.teachers is None and trainer.state.model.precomputed_teacher
    metrics = {name: float(m.compute()) for name, m in trainer.state.eval_metrics['eval'].items()}
    assert set(metrics) == {'LanguageCrossEntropy', 'LanguagePerplexity', 'TeacherDivergenceLoss',
                            'TeacherTop1Agreement'}
    assert all(np.isfinite(v) for v in metrics.values()) and metrics['TeacherDivergenceLoss'] > 0
    assert int(trainer.state.timestamp.batch) == 4
    trainer.close()


def test_temperature_two_trains_on_its_recorded_rest_mass(offline_config) -> None:
    trainer = train(load_config(str(offline_config()), ['model.distillation.temperature=2.0']))
    assert trainer.state.model.temperature == 2.0 and int(trainer.state.timestamp.batch) == 4
    trainer.close()


def test_plain_eval_data_skips_the_teacher_metrics(caplog, offline_config, tiny_assets: Path) -> None:
    config = offline_config(**{'eval_loader.dataset.local': str(tiny_assets / 'data')})
    with caplog.at_level(logging.WARNING, logger='composer_kd'):
        trainer = train(load_config(str(config)))
    assert set(trainer.state.eval_metrics['eval']) == {'LanguageCrossEntropy', 'LanguagePerplexity'}
    assert 'TeacherDivergenceLoss and TeacherTop1Agreement are skipped' in caplog.text
    trainer.close()


def _fails(capsys: pytest.CaptureFixture, tmp_path: Path, config: Path, *overrides: str, match: str) -> None:
    assert_cli_error(capsys, ['train', str(config), *overrides], match)
    assert not (tmp_path / 'runs').exists()


@pytest.mark.parametrize('overrides,match', [
    (['train_loader.dataset.max_seq_len=256'], 'train_loader.dataset.max_seq_len=256 is longer than the 128 tokens'),
    (['model.distillation.temperature=1.5'], 'model.distillation.temperature=1.5: the precomputed teacher at'),
    (['model.teacher.precomputed=false'], 'model.teacher.precomputed must be true'),
    (['model.teacher.pretrained_model_name_or_path=ASSETS/student'], 'was precomputed from another model'),
    (['callbacks.early_stopper.monitor=TeacherDivergenceLoss', 'eval_loader.dataset.local=PLAIN'],
     'callbacks.early_stopper.monitor: the eval data at'),
    (['train_loader.dataset.local=PLAIN'], 'train_loader.dataset: no precomputed teacher at'),
])
def test_refused_before_training(capsys, tmp_path: Path, tiny_assets: Path, offline_config, overrides, match) -> None:
    overrides = [o.replace('PLAIN', str(tiny_assets / 'data')).replace('ASSETS', str(tiny_assets)) for o in overrides]
    _fails(capsys, tmp_path, offline_config(), *overrides, match=match)


def test_the_recipes_teacher_may_be_named_wherever_it_lies(tmp_path: Path, tiny_assets: Path, offline_config) -> None:
    # The data was precomputed by a copy of the tiny teacher that is gone; another copy, elsewhere, is the same model.
    shutil.copytree(tiny_assets / 'teacher', tmp_path / 'moved-teacher')
    config = offline_config(**{'model.teacher.pretrained_model_name_or_path': str(tmp_path / 'moved-teacher')})
    trainer = train(load_config(str(config)))
    assert trainer.state.model.teachers is None and int(trainer.state.timestamp.batch) == 4
    trainer.close()


def test_other_tokenizer_is_refused(capsys, tmp_path: Path, offline_config) -> None:
    text = tmp_path / 'other.txt'
    text.write_text('completely different text, other merges ' * 50)
    train_bpe_tokenizer([str(text)], vocab_size=300, out_dir=str(tmp_path / 'tok'))
    _fails(capsys, tmp_path, offline_config(), f'tokenizer.name={tmp_path / "tok"}',
           match='is not the one the teacher in train_loader.dataset was precomputed with')


def test_eval_data_of_another_teacher_is_refused(capsys, tmp_path: Path, tiny_assets: Path, offline_config) -> None:
    other = _precompute(tmp_path, tiny_assets / 'student', tiny_assets, tiny_assets / 'data', tmp_path / 'other')
    _fails(capsys, tmp_path, offline_config(), f'eval_loader.dataset.local={other}',
           match='eval_loader.dataset: the teacher precomputed at')


def test_loss_equals_online_distillation_at_full_vocabulary(tmp_path: Path, tiny_assets: Path) -> None:
    # 8 samples of 32 tokens, precomputed with K = V in float16 at temperature 2: the whole pipeline (precompute,
    # MDS, loader, collator, decoding, model) against the online teacher on the same batch.
    source = StreamingDataset(local=str(tiny_assets / 'data' / 'val'), shuffle=False, batch_size=1)
    with MDSWriter(columns={'tokens': 'ndarray:int32'}, out=str(tmp_path / 'small' / 'val')) as writer:
        for i in range(8):
            writer.write({'tokens': source[i]['tokens'][:32 - i]})  # uneven lengths: padding in the batch
    out = _precompute(tmp_path, tiny_assets / 'teacher', tiny_assets, tmp_path / 'small', tmp_path / 'full',
                      **{'precompute.top_k': 1024, 'precompute.logprobs': 'float16', 'precompute.temperatures': [2.0]})
    tokenizer = AutoTokenizer.from_pretrained(tiny_assets / 'tokenizer')
    batch = next(iter(build_token_dataloader({'local': str(out), 'split': 'val', 'max_seq_len': 32}, 8,
                                             tokenizer.pad_token_id, teacher_temperature=2.0).dataloader))
    student = AutoModelForCausalLM.from_pretrained(tiny_assets / 'student')
    teacher = AutoModelForCausalLM.from_pretrained(tiny_assets / 'teacher')
    settings = {'alpha': 0.3, 'temperature': 2.0, 'divergence': 'forward_kl'}
    online = DistillationModel(student, teacher, tokenizer, **settings)
    offline = DistillationModel(student, None, tokenizer, precomputed_teacher=True, **settings)
    with torch.no_grad():
        want = online.loss(online(batch), batch)
        got = offline.loss(offline(batch), batch)
    for key in ('total', 'ce', 'kd'):  # float16 log-probs: ~1e-3 relative per entry
        assert got[key].item() == pytest.approx(want[key].item(), rel=2e-3), key
    assert got['kd'].item() > 1e-3

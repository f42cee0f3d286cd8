"""Every bad input: a one-line error naming what is wrong, exit status 2, nothing in ``save_folder``."""

import shutil
import subprocess
import sys

import pytest
from helpers import assert_cli_error

from composer_kd.cli import main
from composer_kd.quickstart.tiny_assets import save_gpt2, train_bpe_tokenizer


def _fails(capsys: pytest.CaptureFixture, tmp_path, config, *overrides: str, match: str) -> None:
    assert_cli_error(capsys, ['train', str(config), *overrides], match)
    assert not (tmp_path / 'runs').exists()


@pytest.mark.parametrize('overrides,match', [
    (['foo=1'], "unknown top-level key 'foo'"),
    (['model.distillation.alpah=0.5'], 'unknown key model.distillation.alpah'),
    (['train_loader.dataset.locl=x'], 'unknown key train_loader.dataset.locl'),
    (['model.distillation.alpha=1.5'], 'model.distillation.alpha must be a number in [0, 1], got 1.5'),
    (['model.distillation.temperature=0'], 'model.distillation.temperature must be a number > 0, got 0'),
    (['model.distillation.divergence=kl'], "got 'kl'"),
    (['model.distillation.beta=0.5'], "divergence 'forward_kl' takes no argument 'beta'"),
    (['model.distillation.fused_head=2'], 'model.distillation.fused_head must be true, false or liger, got 2'),
    (['global_train_batch_size=8', 'device_train_microbatch_size=3'],
     'device_train_microbatch_size=3 does not divide the device batch of 8'),
    (['precision=amp_bf16'], "precision='amp_bf16' needs a GPU"),
    (['optimizer.name=adam9'], "optimizer: unknown name 'adam9'"),
    (['optimizer.lrr=1'], "optimizer.decoupled_adamw: unknown key 'lrr'"),
    (['callbacks.early_stopper.monitor=Accuracy', 'callbacks.early_stopper.dataloader_label=train'],
     "callbacks.early_stopper.monitor='Accuracy' is not a metric"),
    (['callbacks.early_stopper.monitor=LanguageCrossEntropy'],
     "callbacks.early_stopper.dataloader_label='eval' needs an eval_loader"),
    (['autoresume=true', 'run_name=null'], 'autoresume: true needs a run_name'),
    (['fsdp_config.sharding_strategy=FULL_SHARD', 'global_train_batch_size=8'], None),  # 1 process: a warning only
    (['model.teachers=[{pretrained_model_name_or_path: x}]'], 'give model.teacher (one teacher) or model.teachers'),
    (['model.teacher=null', 'model.teachers=[]'], 'model.teachers must be a non-empty list'),
    (['model.teacher=null', 'model.teachers=[x]'], 'model.teachers.0 must be a mapping'),
    (['model.teacher=null', 'model.teachers=[{pretrained_model_name_or_path: /no/such, wieght: 1}]'],
     'unknown key model.teachers.0.wieght'),
    (['model.teacher=null', 'model.teachers=[{config: {model_type: gpt2}, weight: 0}]'],
     'model.teachers.0.weight must be a positive number, got 0'),
    (['model.distillation.ensemble=mean'], "model.distillation.ensemble='mean': use one of ['probs', 'logits']"),
    (['model.teacher=null', 'model.teachers=[{pretrained_model_name_or_path: /no/such/teacher}]'],
     "model.teachers.0.pretrained_model_name_or_path: folder '/no/such/teacher' does not exist"),
])
def test_bad_config_values(capsys, tmp_path, write_config, overrides, match) -> None:
    config = write_config(**{'max_duration': '1ba', 'eval_loader': None, 'save_interval': '1ba'})
    if match is None:  # the one case in the table that must run
        assert main(['train', str(config), *overrides]) == 0
        return
    _fails(capsys, tmp_path, config, *overrides, match=match)


@pytest.mark.parametrize('section', ['optimizer', 'model', 'train_loader', 'tokenizer'])
def test_missing_required_section(capsys, tmp_path, write_config, section) -> None:
    _fails(capsys, tmp_path, write_config(**{section: None}), match=f"missing required key '{section}'")


def test_missing_model_folders(capsys, tmp_path, write_config) -> None:
    config = write_config()
    for who in ('teacher', 'student'):
        _fails(capsys, tmp_path, config, f'model.{who}.pretrained_model_name_or_path={tmp_path}/nope',
               match=f"model.{who}.pretrained_model_name_or_path: folder '{tmp_path}/nope' does not exist")


def test_missing_or_empty_data(capsys, tmp_path, write_config) -> None:
    config = write_config()
    _fails(capsys, tmp_path, config, f'train_loader.dataset.local={tmp_path}/none',
           match='train_loader: no MDS dataset')
    (tmp_path / 'empty' / 'train').mkdir(parents=True)
    _fails(capsys, tmp_path, config, f'train_loader.dataset.local={tmp_path}/empty', match='missing')


def test_teacher_with_a_different_tokenizer(capsys, tmp_path, tiny_assets, write_config) -> None:
    teacher = tmp_path / 'teacher'
    shutil.copytree(tiny_assets / 'teacher', teacher)
    text = tmp_path / 'other.txt'
    text.write_text('a teacher trained on other text has other merges and ids ' * 40)
    train_bpe_tokenizer([str(text)], vocab_size=400, out_dir=str(teacher))
    _fails(capsys, tmp_path, write_config(), f'model.teacher.pretrained_model_name_or_path={teacher}',
           match='model.teacher: the model.teacher tokenizer maps token')
    # Each member of an ensemble is checked, and named by its place in the list.
    ensemble = f'model.teachers=[{{pretrained_model_name_or_path: {tiny_assets / "teacher"}}}, ' \
               f'{{pretrained_model_name_or_path: {teacher}}}]'
    _fails(capsys, tmp_path, write_config(), 'model.teacher=null', ensemble,
           match='model.teachers.1: the model.teachers.1 tokenizer maps token')


def test_tokenizer_longer_than_student_embeddings(capsys, tmp_path, write_config) -> None:
    small = tmp_path / 'small-student'
    save_gpt2(str(small), vocab_size=500, n_layer=1, n_embd=16, n_head=2, n_positions=128)
    _fails(capsys, tmp_path, write_config(), f'model.student.pretrained_model_name_or_path={small}',
           match='but the student has only 500 embedding rows')


def test_yaml_errors(capsys, tmp_path) -> None:
    bad = tmp_path / 'bad.yaml'
    bad.write_text('model: {student: [\n')
    _fails(capsys, tmp_path, bad, match='cannot parse YAML (line')
    _fails(capsys, tmp_path, tmp_path / 'missing.yaml', match='config file not found')
    bad.write_text('variables: {a: 1}\nrun_name: ${variables.b}\n')
    _fails(capsys, tmp_path, bad, match='variables.b')


def test_cli_prints_one_line_and_no_traceback(tmp_path, write_config) -> None:
    config = write_config()
    proc = subprocess.run([sys.executable, '-m', 'composer_kd', 'train', str(config), 'model.distillation.alpha=2'],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert 'Traceback' not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        'composer-kd train: error: model.distillation.alpha must be a number in [0, 1], got 2')
    assert not (tmp_path / 'runs').exists()

"""Every bad input: a one-line error naming what is wrong, exit status 2, nothing in ``save_folder``."""

import fractions
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_cli_error
from reliability import record

from composer_kd.cli import main
from composer_kd.quickstart.tiny_assets import save_gpt2, train_bpe_tokenizer


def _fails(capsys: pytest.CaptureFixture, tmp_path, config, *overrides: str, match: str) -> None:
    assert_cli_error(capsys, ['train', str(config), *overrides], match)
    assert not (tmp_path / 'runs').exists()
    record(f'train {" ".join(overrides)}'.strip(), f'exit 2: ...{match}', lost='nothing (refused before loading)')


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
    # Values the Trainer, loaders, optimizer, scheduler and callbacks receive: refused before anything loads.
    (['seed=abc'], "seed must be an integer in [0, 2^32), got 'abc'"),
    (['dist_timeout=abc'], "dist_timeout must be a number of seconds > 0, got 'abc'"),
    (['python_log_level=verbose'], "python_log_level must be one of ['debug', 'info', 'warning', 'error', "
     "'critical'], got 'verbose'"),
    (['max_duration=10xx'], "max_duration must be a positive time such as 10ep, 10ba, 10sp, 10tok (or an int "
     "number of epochs), got '10xx'"),
    (['eval_interval=abc'], "eval_interval must be a positive time such as"),
    (['save_interval=0ba'], "save_interval must be a positive time such as"),
    (['optimizer.lr=abc'], "optimizer.lr must be a number, got 'abc'"),
    (['optimizer.betas=[0.9]'], 'optimizer.betas must be a list of 2 (a number, a number), got [0.9]'),
    (['optimizer.lr=-1'], 'optimizer.decoupled_adamw: Invalid learning rate: -1'),
    (['scheduler.t_warmup=5xx'], "scheduler.t_warmup must be a time such as 100ba or 0.1dur, got '5xx'"),
    (['algorithms.gradient_clipping.clipping_type=bogus'],
     "algorithms.gradient_clipping.clipping_type must be one of ['adaptive', 'norm', 'value'], got 'bogus'"),
    (['callbacks.speed_monitor.window_size=abc'], "callbacks.speed_monitor.window_size must be an integer, got 'abc'"),
    (['train_loader.dataset.max_seq_len=0'], 'train_loader.dataset.max_seq_len must be a positive integer, got 0'),
    (['train_loader.dataset.max_seq_len=-1'], 'train_loader.dataset.max_seq_len must be a positive integer, got -1'),
    (['train_loader.dataset.max_seq_len=64'],
     'train_loader.dataset.max_seq_len=64 disagrees with the top-level max_seq_len=128'),
    (['max_seq_len=0'], 'max_seq_len must be a positive integer, got 0'),
    (['train_loader.num_workers=-1'], 'train_loader.num_workers must be an integer ≥ 0, got -1'),
    (['train_loader.prefetch_factor=2'], 'train_loader.prefetch_factor needs train_loader.num_workers > 0'),
    (['train_loader.dataset.shuffle_algo=x'], "train_loader.dataset.shuffle_algo must be one of"),
    (['train_loader.drop_last=maybe'], "train_loader.drop_last must be true or false, got 'maybe'"),
    (['save_num_checkpoints_to_keep=-3'], 'save_num_checkpoints_to_keep must be an integer ≥ -1'),
    (['load_path=/no/such.pt'], 'load_path: no such checkpoint file or folder: /no/such.pt'),
    (['model.student.trust_remote_code=maybe'], "model.student.trust_remote_code must be true or false, got 'maybe'"),
    (['model.teacher.torch_dtype=float8'], "model.teacher.torch_dtype must be one of"),
    (['eval_first=1'], 'eval_first must be true or false, got 1'),
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


def test_quickstart_refuses_bad_settings_before_any_stage(capsys, tmp_path) -> None:
    out = tmp_path / 'qs'
    assert_cli_error(capsys, ['quickstart', '--out', str(out), '--alpha', '5', '--divergence', 'bogus'],
                     '--alpha must be a number in [0, 1], got 5.0')
    assert_cli_error(capsys, ['quickstart', '--out', str(out), '--divergence', 'bogus'], "--divergence must be one of")
    assert not out.exists()
    record('quickstart --alpha 5 --divergence bogus', 'exit 2: --alpha must be a number in [0, 1], got 5.0',
           lost='nothing (refused before any stage)')


def test_export_refuses_what_is_not_a_safe_checkpoint(capsys, tmp_path) -> None:
    readme = Path(__file__).resolve().parents[1] / 'README.md'
    assert_cli_error(capsys, ['export', str(readme), str(tmp_path / 'out')],
                     f'checkpoint: {readme} is not a Composer checkpoint (not a torch.save file)')
    evil = tmp_path / 'evil.pt'
    torch.save({'state': {'model': {}}, 'x': fractions.Fraction(1, 3)}, evil)  # any global outside the allowlist
    assert_cli_error(capsys, ['export', str(evil), str(tmp_path / 'out')],
                     'holds objects outside the safe list (fractions.Fraction); it is a pickle that can run code')
    assert_cli_error(capsys, ['export', str(evil), str(tmp_path / 'out'), '--trust-pickle'],
                     'has no Hugging Face metadata')  # trusted: loaded, then refused for what it holds
    assert not (tmp_path / 'out').exists()
    record('export README.md out', 'exit 2: checkpoint: README.md is not a Composer checkpoint (not a torch.save file)')
    record('export of a checkpoint pickling an object outside the allowlist', 'exit 2: ... holds objects outside '
           'the safe list (fractions.Fraction); it is a pickle that can run code: pass --trust-pickle only if you '
           'trust its source', lost='nothing (not unpickled)')


def test_cli_prints_one_line_and_no_traceback(tmp_path, write_config) -> None:
    config = write_config()
    proc = subprocess.run([sys.executable, '-m', 'composer_kd', 'train', str(config), 'model.distillation.alpha=2'],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert 'Traceback' not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        'composer-kd train: error: model.distillation.alpha must be a number in [0, 1], got 2')
    assert not (tmp_path / 'runs').exists()

"""LLM Foundry ``model:`` blocks port as written: Foundry's 8B block checks with ``train --check`` (which loads
nothing), keys we cannot honour are refused by name with the reason, ``pretrained: false``, ``revision`` and a
Hub id's tokenizer mean what they mean in Foundry, and ``init_device: mixed`` (rank 0 loads, the other ranks
build on ``meta`` and receive their shards) trains the student the ``cpu`` init trains, bit for bit."""

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from composer.utils.object_store import LibcloudObjectStore
from helpers import assert_cli_error
from omegaconf import OmegaConf
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from composer_kd.cli import main
from composer_kd.run.export import download_sharded, load_checkpoint
from composer_kd.builders.models import build_causal_lm
from composer_kd.config.loading import recipe_path

# scripts/train/yamls/pretrain/hf-llama-3.1-8B.yaml of LLM Foundry, its model block as written.
FOUNDRY_8B_BLOCK = {
    'name': 'hf_causal_lm',
    'init_device': 'meta',
    'pretrained_model_name_or_path': 'meta-llama/Meta-Llama-3.1-8B',
    'pretrained': False,
    'use_auth_token': True,
    'use_flash_attention_2': True,
    'config_overrides': {'torch_dtype': 'bfloat16'},
}


@pytest.fixture
def foundry_recipe(tmp_path: Path) -> Path:
    """The shipped 8B→1B recipe with Foundry's block as the student and, pretrained and ``mixed``, the teacher."""
    cfg = OmegaConf.load(recipe_path('llama3-8b-to-1b'))
    cfg.model.student = dict(FOUNDRY_8B_BLOCK)
    cfg.model.teacher = {**FOUNDRY_8B_BLOCK, 'pretrained': True, 'init_device': 'mixed'}
    path = tmp_path / 'foundry.yaml'
    OmegaConf.save(cfg, path)
    return path


@pytest.fixture
def nothing_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f'train --check loaded {args[:1]}')

    for cls in (AutoConfig, AutoTokenizer, AutoModelForCausalLM):
        monkeypatch.setattr(cls, 'from_pretrained', refuse)
    monkeypatch.setattr(AutoModelForCausalLM, 'from_config', refuse)


def test_foundry_8b_block_checks_for_eight_gpus_without_loading(capsys, foundry_recipe: Path, nothing_loads) -> None:
    assert main(['train', str(foundry_recipe), '--check', '--world-size', '8', '--device', 'gpu']) == 0
    out = capsys.readouterr().out
    assert 'OK for 8 GPU process(es), FSDP1, precision amp_bf16' in out and 'nothing was loaded' in out, out
    assert not (foundry_recipe.parent / 'llama3-8b-to-1b').exists()  # no save_folder either


def test_check_refuses_what_the_run_would_refuse(capsys, monkeypatch, foundry_recipe: Path, nothing_loads) -> None:
    check = ['train', str(foundry_recipe), '--check', '--world-size', '2', '--device', 'cpu']
    assert_cli_error(capsys, check, "precision='amp_bf16' needs a GPU")
    monkeypatch.setenv('FSDP_VERSION', '2')
    assert_cli_error(capsys, [*check, 'precision=fp32'], 'model.student.init_device: meta needs CUDA')
    assert_cli_error(capsys, ['train', str(foundry_recipe), '--check', '--world-size', '8', '--device', 'gpu',
                              'global_train_batch_size=12'], 'not divisible by the 8 processes')
    assert_cli_error(capsys, ['train', str(foundry_recipe), '--check', '--world-size', '0'], '--world-size')


@pytest.mark.parametrize('edit, match', [
    ({'peft_config': {'peft_type': 'LORA', 'r': 8}}, 'model.student.peft_config='),
    ({'load_in_8bit': True}, 'model.student.load_in_8bit=True is not supported: 8-bit weights'),
    ({'name': 'mpt_causal_lm'}, "model.student.name must be 'hf_causal_lm'"),
    ({'attn_implementation': 'sdpa'}, 'use_flash_attention_2: true and attn_implementation: sdpa disagree'),
    ({'pretrained': True}, 'model.student.init_device: meta builds empty weights'),
    ({'init_device': 'gpu'}, "model.student.init_device must be one of ['cpu', 'meta', 'mixed']"),
    ({'token': 'hf_x'}, 'give token or use_auth_token (its old name), not both'),
    ({'revision': ''}, 'model.student.revision must be a branch, tag or commit'),
    ({'use_train_metrics': False}, 'the metrics are fixed'),
])
def test_foundry_keys_we_cannot_honour_are_refused_by_name(capsys, foundry_recipe: Path, nothing_loads,
                                                          edit: dict, match: str) -> None:
    cfg = OmegaConf.load(foundry_recipe)
    cfg.model.student = {**FOUNDRY_8B_BLOCK, **edit}
    OmegaConf.save(cfg, foundry_recipe)
    assert_cli_error(capsys, ['train', str(foundry_recipe), '--check', '--world-size', '8', '--device', 'gpu'], match)


def test_pretrained_false_builds_a_fresh_model_from_the_saved_config(tiny_assets: Path) -> None:
    saved = AutoModelForCausalLM.from_pretrained(tiny_assets / 'student')
    fresh = build_causal_lm('model.student', {'pretrained_model_name_or_path': str(tiny_assets / 'student'),
                                              'pretrained': False})
    assert fresh.config.to_dict() == saved.config.to_dict() | {'_name_or_path': fresh.config._name_or_path}
    weights = dict(saved.named_parameters())
    assert all(p.shape == weights[n].shape for n, p in fresh.named_parameters())
    assert not torch.equal(fresh.get_input_embeddings().weight, saved.get_input_embeddings().weight)


_HUB_SCRIPT = '''
import sys
from composer_kd.errors import ConfigError
from composer_kd.builders.models import build_causal_lm, check_model_tokenizer
from transformers import AutoTokenizer
run_tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
section = {'pretrained_model_name_or_path': 'tiny-org/teacher'}
print('main layers', build_causal_lm('t', section).config.n_layer)
print('v2 layers', build_causal_lm('t', {**section, 'revision': 'v2'}).config.n_layer)
check_model_tokenizer('model.teacher', section, run_tokenizer)
print('same tokenizer: accepted')
try:
    check_model_tokenizer('model.teacher', {**section, 'revision': 'v2'}, run_tokenizer)
except ConfigError as e:
    print('refused:', e)
'''


def _snapshot(cache: Path, repo: str, ref: str, commit: str, model: Any, tokenizer: Any) -> None:
    root = cache / f'models--{repo.replace("/", "--")}'
    model.save_pretrained(root / 'snapshots' / commit)
    tokenizer.save_pretrained(root / 'snapshots' / commit)
    (root / 'refs').mkdir(parents=True, exist_ok=True)
    (root / 'refs' / ref).write_text(commit)


@pytest.mark.slow
def test_hub_ids_take_revision_and_their_tokenizer_is_checked(tmp_path: Path, tiny_assets: Path) -> None:
    """A Hub id resolved from a Hugging Face cache laid out as the Hub writes it (offline): ``revision`` picks the
    snapshot, and the teacher's tokenizer is compared with the run's though the teacher is no local folder."""
    cache = tmp_path / 'hub'
    teacher = AutoModelForCausalLM.from_pretrained(tiny_assets / 'teacher')
    tokenizer = AutoTokenizer.from_pretrained(tiny_assets / 'tokenizer')
    _snapshot(cache, 'tiny-org/teacher', 'main', 'a' * 40, teacher, tokenizer)
    deeper = AutoModelForCausalLM.from_config(teacher.config.__class__(**{**teacher.config.to_dict(), 'n_layer': 3}))
    other = AutoTokenizer.from_pretrained(tiny_assets / 'tokenizer')
    other.add_tokens(['<an-extra-token>'])
    other.pad_token = other.eos_token = other.convert_ids_to_tokens(3)  # special ids moved: a different vocabulary
    _snapshot(cache, 'tiny-org/teacher', 'v2', 'b' * 40, deeper, other)
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE='1')
    proc = subprocess.run([sys.executable, '-c', _HUB_SCRIPT, str(tiny_assets / 'tokenizer')], capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[:3] == [f'main layers {teacher.config.n_layer}', 'v2 layers 3', 'same tokenizer: accepted'], lines
    assert lines[3].startswith('refused: model.teacher:'), lines


@pytest.mark.slow
@pytest.mark.launcher
def test_mixed_init_trains_the_student_the_cpu_init_trains(tmp_path: Path, tiny_assets: Path) -> None:
    """2 processes, FSDP2: rank 0 loads student and teacher, rank 1 builds them on meta and receives its shards.
    The mixed run also writes the student with ``hf_checkpointer`` (gathered from both ranks onto rank 0)."""
    students = {}
    hf = f'callbacks={{hf_checkpointer: {{save_folder: {tmp_path / "hf"}, save_interval: 4ba}}}}'
    for mode in ('cpu', 'mixed'):
        logs = ['--stdout', str(tmp_path / f'{mode}{{rank}}.out'), '--stderr', str(tmp_path / f'{mode}{{rank}}.err')]
        cmd = [sys.executable, '-m', 'composer.cli.launcher', '-n', '2', *logs, '-m', 'composer_kd', 'train',
               'tiny-cpu', f'variables.assets={tiny_assets}', f'model.student.init_device={mode}',
               f'model.teacher.init_device={mode}', 'max_duration=4ba', 'eval_loader=null', 'save_interval=4ba',
               'fsdp_config={state_dict_type: sharded}', f'save_folder={tmp_path / mode}', 'progress_bar=false',
               *([hf] if mode == 'mixed' else [])]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ, FSDP_VERSION='2'))
        errors = ''.join(p.read_text()[-3000:] for p in tmp_path.glob(f'{mode}*.err'))
        assert proc.returncode == 0, proc.stderr[-3000:] + errors
        assert main(['export', str(tmp_path / mode / 'ep0-ba4'), str(tmp_path / f'{mode}-student')]) == 0
        students[mode] = load_file(tmp_path / f'{mode}-student' / 'model.safetensors')
    students['hf_checkpointer'] = load_file(tmp_path / 'hf' / 'huggingface' / 'ba4' / 'model.safetensors')
    # export read the sharded checkpoint's model and metadata alone, not the optimizer state.
    sharded = tmp_path / 'mixed' / 'ep0-ba4'
    assert set(load_checkpoint(str(sharded))['state']) == {'model', 'integrations'}
    # The same folder through an object store (Apache Libcloud's local provider): listed, downloaded, exported.
    (tmp_path / 'store' / 'bucket').mkdir(parents=True)
    store = LibcloudObjectStore(provider='local', container='bucket', provider_kwargs={'key': str(tmp_path / 'store')})
    for path in sharded.rglob('*'):
        if path.is_file():
            store.upload_object(f'runs/ep0-ba4/{path.relative_to(sharded)}', str(path))
    download_sharded(store, 'runs/ep0-ba4', str(tmp_path / 'downloaded'))
    assert main(['export', str(tmp_path / 'downloaded'), str(tmp_path / 'from-store')]) == 0
    students['from-store'] = load_file(tmp_path / 'from-store' / 'model.safetensors')
    for other in ('mixed', 'hf_checkpointer', 'from-store'):
        assert students['cpu'].keys() == students[other].keys(), other
        for name, weight in students['cpu'].items():
            assert torch.equal(weight, students[other][name]), (other, name)

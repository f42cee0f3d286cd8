"""composer-kd as an LLM Foundry plugin (``composer_kd/foundry``): Foundry's own ``train`` builds our model, callbacks
and precomputed-teacher loader from its registries (the entry points in ``pyproject.toml``) and trains the student
``composer-kd train`` trains, to the bit; the teacher never changes and AdamW keeps no state for it; a second run
autoresumes; ``hf_checkpointer`` writes the student; an ICL task scores the student as ``llmfoundry eval`` scores the
exported student.

The Foundry tests need LLM Foundry 0.22 in its own venv (it pins transformers 4.51 and Streaming 0.12): the python
named by ``COMPOSER_KD_FOUNDRY_PYTHON`` (``.ci/run`` builds one) or ``.venv-foundry/bin/python`` in the repository;
without either they are skipped. The tests of the plugin's own code run in this venv, without Foundry.
"""

import csv
import json
import os
import random
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
import torch
from helpers import assert_cli_error
from omegaconf import OmegaConf
from safetensors.torch import load_file

from composer_kd.cli import main
from composer_kd.config.loading import recipe_path
from composer_kd.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
FOUNDRY_YAML = recipe_path('foundry/tiny-cpu')
ICL_METRIC = 'metrics/tiny_mc/0-shot/InContextLearningMultipleChoiceAccuracy'


def _foundry_python() -> Optional[Path]:
    given = os.environ.get('COMPOSER_KD_FOUNDRY_PYTHON')
    if given:  # set (CI): it must be there
        assert Path(given).is_file(), f'COMPOSER_KD_FOUNDRY_PYTHON={given} does not exist'
        return Path(given)
    local = REPO / '.venv-foundry' / 'bin' / 'python'
    return local if local.is_file() else None


FOUNDRY_PYTHON = _foundry_python()


def needs_foundry(test: Callable[..., None]) -> Callable[..., None]:
    """A slow test that runs LLM Foundry: skipped without its venv."""
    skip = pytest.mark.skipif(FOUNDRY_PYTHON is None, reason='no LLM Foundry venv (COMPOSER_KD_FOUNDRY_PYTHON)')
    return pytest.mark.slow(skip(test))


def _foundry(args: list[str], cwd: Path, log: str) -> str:
    """Runs Foundry's python with ``args`` in ``cwd``; returns its output (also kept in ``cwd/log``)."""
    env = {**os.environ, 'TOKENIZERS_PARALLELISM': 'false'}
    done = subprocess.run([str(FOUNDRY_PYTHON), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)
    (cwd / log).write_text(done.stdout + done.stderr)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return done.stdout + done.stderr


def _foundry_train(cfg: Any, cwd: Path, name: str) -> tuple[dict[str, Any], str]:
    """``tests/foundry_train.py`` on ``cfg``: Foundry's report and output."""
    OmegaConf.save(cfg, cwd / f'{name}.yaml')
    out = _foundry([str(REPO / 'tests' / 'foundry_train.py'), f'{name}.yaml', f'{name}.json'], cwd, f'{name}.log')
    return json.loads((cwd / f'{name}.json').read_text()), out


def _foundry_config(tmp_path: Path, assets: Path, **edits: Any) -> Any:
    cfg = OmegaConf.load(FOUNDRY_YAML)
    cfg.variables.assets = str(assets)
    cfg.save_folder = str(tmp_path / 'runs' / '{run_name}' / 'checkpoints')
    cfg.callbacks.hf_checkpointer.save_folder = str(tmp_path / 'runs' / '{run_name}' / 'hf')
    for key, value in edits.items():
        OmegaConf.update(cfg, key, value, merge=False)
    return cfg


def _composer_kd_config(foundry_cfg: Any) -> Any:
    """The same run in ``composer-kd train``'s dialect: no model name, loaders without Foundry's name and worker
    settings, no ICL tasks."""
    cfg = OmegaConf.to_container(foundry_cfg, resolve=True)
    del cfg['model']['name'], cfg['autoresume']
    for key in ('icl_tasks', 'icl_seq_len'):
        cfg.pop(key, None)
    for loader in ('train_loader', 'eval_loader'):
        for key in ('name', 'prefetch_factor', 'persistent_workers', 'teacher_temperature'):
            cfg[loader].pop(key, None)
    return OmegaConf.create(cfg)


def _student(folder: Path) -> dict[str, Any]:
    files = sorted(folder.glob('*.safetensors'))
    assert files, f'no safetensors in {folder}'
    return {k: v for f in files for k, v in load_file(f).items()}


def _assert_same_student(a: Path, b: Path) -> float:
    one, two = _student(a), _student(b)
    assert one.keys() == two.keys()
    diff = max((one[k] - two[k]).abs().max().item() for k in one)
    assert diff <= 1e-6, f'{a} and {b} differ by {diff}'
    return diff


def _multiple_choice_task(path: Path, questions: int = 64) -> None:
    """A tiny multiple-choice ICL task in Foundry's jsonl format (``query``, ``choices``, ``gold``)."""
    words = ['the', 'river', 'stone', 'moon', 'tree', 'dog', 'red', 'house', 'light', 'water', 'old', 'king']
    rng = random.Random(0)
    with path.open('w') as f:
        for _ in range(questions):
            choices = [' ' + ' '.join(rng.choices(words, k=rng.randint(1, 3))) for _ in range(6)]
            f.write(json.dumps({'query': ' '.join(rng.choices(words, k=6)), 'choices': choices,
                                'gold': rng.randrange(6)}) + '\n')


def _logged(out: str, name: str) -> float:
    found = re.findall(rf'{re.escape(name)}: ([0-9.eE+-]+)', out)
    assert found, f'{name} was not logged'
    return float(found[-1])


@needs_foundry
def test_foundry_finds_the_plugin_in_its_registries(tmp_path: Path) -> None:
    llmfoundry = FOUNDRY_PYTHON.parent / 'llmfoundry'
    done = subprocess.run([str(llmfoundry), 'registry', 'find', 'models', 'composer_kd_distillation'],
                          capture_output=True, text=True, timeout=300, env={**os.environ, 'COLUMNS': '400'})
    assert done.returncode == 0 and 'composer_kd.foundry.model' in done.stdout, done.stdout + done.stderr
    check = '''
import pathlib, llmfoundry
from llmfoundry import registry
ours = {'models': ['composer_kd_distillation'],
        'callbacks': ['kd_monitor', 'kd_schedule', 'per_sample_log', 'kd_early_stopper'],
        'dataloaders': ['composer_kd_precomputed', 'composer_kd_tokens'], 'config_transforms': ['composer_kd']}
for name, keys in ours.items():
    for key in keys:
        assert getattr(registry, name).get(key).__module__.startswith('composer_kd.'), (name, key)
# none of our names is one Foundry registers itself (an entry point would replace it in every run)
source = '\\n'.join(p.read_text() for p in pathlib.Path(llmfoundry.__file__).parent.rglob('*.py'))
for keys in ours.values():
    for key in keys:
        assert f"'{key}'" not in source and f'"{key}"' not in source, key
for key in ('hf_checkpointer', 'early_stopper', 'scheduled_gc', 'speed_monitor'):
    assert not registry.callbacks.get(key).__module__.startswith('composer_kd'), key

# the 8B recipe in Foundry's dialect passes Foundry's config processing and our model block's checks, loading nothing
from llmfoundry.command_utils.train import validate_config
from llmfoundry.utils.config_utils import TRAIN_CONFIG_KEYS, TrainConfig, make_dataclass_and_log_config, \
    process_init_device
from omegaconf import OmegaConf
from composer_kd.config.loading import recipe_path
from composer_kd.foundry.model import model_block
cfg = OmegaConf.load(recipe_path('foundry/llama3-8b-to-1b'))
_, train_cfg = make_dataclass_and_log_config(cfg, TrainConfig, TRAIN_CONFIG_KEYS, transforms='all')
validate_config(train_cfg)
process_init_device(train_cfg.model, train_cfg.fsdp_config)
assert train_cfg.fsdp_config['sync_module_states'] is True
assert set(train_cfg.callbacks) >= {'kd_monitor', 'kd_early_stopper', 'hf_checkpointer'}
block = model_block({k: v for k, v in train_cfg.model.items() if k != 'name'})
assert block['student']['init_device'] == block['teacher']['init_device'] == 'mixed'
print('ok')
'''
    assert 'ok' in _foundry(['-c', check], tmp_path, 'registry.log').splitlines()


@needs_foundry
def test_llmfoundry_train_equals_composer_kd_train_autoresumes_and_scores_icl_on_the_student(
        tmp_path: Path, tiny_assets: Path) -> None:
    assets = tmp_path / 'assets'
    shutil.copytree(tiny_assets, assets)
    _multiple_choice_task(tmp_path / 'mc.jsonl')
    cfg = _foundry_config(tmp_path, assets, **{
        'max_duration': '3ba', 'eval_interval': '3ba', 'save_interval': '3ba', 'eval_subset_num_batches': -1,
        'scheduler': {'name': 'constant_with_warmup', 't_warmup': '2ba'}, 'callbacks.hf_checkpointer.save_interval':
        '3ba', 'icl_seq_len': 64, 'icl_tasks': [{'label': 'tiny_mc', 'dataset_uri': str(tmp_path / 'mc.jsonl'),
                                                  'num_fewshot': [0], 'icl_task_type': 'multiple_choice'}]})
    first, first_out = _foundry_train(cfg, tmp_path, 'first')
    cfg.max_duration = '6ba'
    second, second_out = _foundry_train(cfg, tmp_path, 'second')
    hf = tmp_path / 'runs' / 'foundry-tiny-cpu' / 'hf' / 'huggingface'

    # Foundry around the model: the student's count logged, the teacher untouched and outside AdamW's state
    for report, out in ((first, first_out), (second, second_out)):
        assert report['model_class'] == 'FoundryDistillationModel'
        assert _logged(out, 'n_params') == _logged(out, 'n_trainable_params') == report['student_params'] \
            == report['n_total_params'] == report['n_active_params']
        assert report['optimizer_state_entries'] == report['student_tensors']
        assert report['teacher_tensors_with_optimizer_state'] == 0 and not report['teacher_requires_grad']
        assert report['teacher_tensors_compared'] > 0 and report['teacher_max_abs_change'] == 0.0
    assert first['batch'] == 3 and second['batch'] == 6
    assert 'Trainer checkpoint loaded from' not in first_out
    assert re.search(r'Trainer checkpoint loaded from \S*latest-rank0.pt', second_out), 'no autoresume'
    assert (hf / 'ba3').is_dir() and (hf / 'ba6').is_dir()

    # the same run through composer-kd train, 6 batches without a break: the same student
    ours = _composer_kd_config(cfg)
    ours.run_name = 'composer-kd'
    ours.save_folder = str(tmp_path / 'ours' / 'checkpoints')
    ours.callbacks.hf_checkpointer.save_folder = str(tmp_path / 'ours' / 'hf')
    OmegaConf.save(ours, tmp_path / 'ours.yaml')
    assert main(['train', str(tmp_path / 'ours.yaml')]) == 0
    _assert_same_student(hf / 'ba6', tmp_path / 'ours' / 'hf' / 'huggingface' / 'ba6')

    # the ICL task scored the student: llmfoundry eval agrees on the student exported at that step (and scores
    # the teacher differently, so the agreement says which model was scored)
    scores = {}
    for name, folder in (('student', hf / 'ba3'), ('teacher', assets / 'teacher')):
        evaluation = {'max_seq_len': 64, 'seed': 17, 'precision': 'fp32', 'device_eval_batch_size': 8,
                      'models': [{'model_name': name, 'tokenizer': {'name': str(assets / 'tokenizer')},
                                  'model': {'name': 'hf_causal_lm', 'pretrained': True,
                                            'pretrained_model_name_or_path': str(folder)}}],
                      'icl_tasks': OmegaConf.to_container(cfg.icl_tasks)}
        OmegaConf.save(OmegaConf.create(evaluation), tmp_path / f'eval-{name}.yaml')
        out = _foundry(['-c', f'from llmfoundry.command_utils import eval_from_yaml; '
                        f'eval_from_yaml("eval-{name}.yaml", [])'], tmp_path, f'eval-{name}.log')
        scores[name] = _logged(out, ICL_METRIC)
    assert _logged(first_out, ICL_METRIC) == scores['student'] != scores['teacher'], scores


@needs_foundry
def test_offline_distillation_under_llmfoundry_train(tmp_path: Path, tiny_assets: Path, tiny_topk: Path) -> None:
    topk = tmp_path / 'topk'
    shutil.copytree(tiny_topk, topk)
    cfg = _foundry_config(tmp_path, tiny_assets, **{
        'model.teacher': {'precomputed': True}, 'max_duration': '3ba', 'eval_interval': '3ba', 'save_interval': '3ba',
        'callbacks.hf_checkpointer.save_interval': '3ba',
        'callbacks.per_sample_log': {'folder': str(tmp_path / 'samples')}})
    for loader in ('train_loader', 'eval_loader'):
        cfg[loader].name = 'composer_kd_precomputed'
        cfg[loader].dataset.local = str(topk)
        cfg[loader].dataset.split = 'val'
    report, out = _foundry_train(cfg, tmp_path, 'offline')
    assert report['batch'] == 3 and report['optimizer_state_entries'] == report['student_tensors']
    assert 'teacher_max_abs_change' not in report  # no teacher model was loaded
    assert _logged(out, 'metrics/eval/TeacherDivergenceLoss') > 0  # the precomputed teacher's metrics
    # per_sample_log: our loader's batches carry sample_id
    with (tmp_path / 'samples' / 'samples-rank0.csv').open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 * 8 and {r['step'] for r in rows} == {'0', '1', '2'} and all(r['kd'] for r in rows)

    ours = _composer_kd_config(cfg)
    ours.run_name, ours.save_folder = 'composer-kd', str(tmp_path / 'ours' / 'checkpoints')
    ours.callbacks.hf_checkpointer.save_folder = str(tmp_path / 'ours' / 'hf')
    OmegaConf.save(ours, tmp_path / 'ours.yaml')
    assert main(['train', str(tmp_path / 'ours.yaml')]) == 0
    _assert_same_student(tmp_path / 'runs' / 'foundry-tiny-cpu' / 'hf' / 'huggingface' / 'ba3',
                         tmp_path / 'ours' / 'hf' / 'huggingface' / 'ba3')


@needs_foundry
def test_master_weights_dtype_casts_the_whole_model(tmp_path: Path, tiny_assets: Path) -> None:
    cfg = _foundry_config(tmp_path, tiny_assets, **{
        'model.master_weights_dtype': 'bf16', 'max_duration': '2ba', 'eval_interval': '2ba', 'save_interval': '2ba',
        'callbacks.hf_checkpointer.save_interval': '2ba'})
    report, out = _foundry_train(cfg, tmp_path, 'bf16')
    assert report['dtypes'] == ['torch.bfloat16'] and report['batch'] == 2
    assert report['teacher_max_abs_change'] == 0.0  # against the files cast to bf16: never updated
    assert 0 < _logged(out, 'loss/train/total') < 20


# -- the plugin's own code, in this venv (no Foundry needed) ----------------------------------------------------------

def _block(tiny_assets: Path, **edits: Any) -> dict[str, Any]:
    block = {'student': {'pretrained_model_name_or_path': str(tiny_assets / 'student')},
             'teacher': {'pretrained_model_name_or_path': str(tiny_assets / 'teacher')},
             'distillation': {'alpha': 0.5}}
    block.update(edits)
    return block


def test_the_model_block_builds_the_student_and_counts_what_is_trained(tiny_assets: Path) -> None:
    from transformers import AutoTokenizer

    from composer_kd.foundry.model import FoundryDistillationModel
    tokenizer = AutoTokenizer.from_pretrained(tiny_assets / 'tokenizer')
    model = FoundryDistillationModel(tokenizer=tokenizer, init_device='cpu', **_block(tiny_assets))
    student = sum(p.numel() for p in model.model.parameters())
    assert model.n_total_params == model.n_active_params == student
    assert student < sum(p.numel() for p in model.parameters())  # the teacher is there, not counted
    assert all(not p.requires_grad for p in model.teachers.parameters())


@pytest.mark.parametrize('edits, match', [
    ({'distillation': {'on_policy': {'fraction': 0.5}}}, 'model.distillation.on_policy: on-policy distillation needs'),
    ({'distilation': {'alpha': 0.5}}, "model.distilation"),
    ({'init_device': 'gpu'}, 'model.init_device'),
    ({'distillation': {'alpha': 1.5}}, 'model.distillation.alpha'),
    ({'teacher': None}, 'model.teacher'),
])
def test_the_model_block_refuses_bad_keys_by_name(tiny_assets: Path, edits: dict, match: str) -> None:
    from composer_kd.foundry.model import model_block
    block = _block(tiny_assets, **edits)
    block = {k: v for k, v in block.items() if v is not None}
    with pytest.raises(ConfigError, match=re.escape(match)):
        model_block(block)


def test_the_model_block_gives_foundrys_init_device_to_sections_without_their_own(tiny_assets: Path) -> None:
    from composer_kd.foundry.model import model_block
    block = _block(tiny_assets, init_device='cpu')
    block['teacher'] = {**block['teacher'], 'init_device': 'mixed'}
    cfg = model_block(block)
    assert cfg['student']['init_device'] == 'cpu' and cfg['teacher']['init_device'] == 'mixed'
    assert 'init_device' not in cfg


def test_the_config_transform_touches_only_our_model() -> None:
    from composer_kd.foundry.transforms import composer_kd_transform
    theirs = {'model': {'name': 'hf_causal_lm', 'init_device': 'mixed'}, 'fsdp_config': {},
              'train_loader': {'name': 'composer_kd_precomputed'}}
    assert composer_kd_transform(json.loads(json.dumps(theirs))) == theirs
    ours = {'model': {'name': 'composer_kd_distillation', 'student': {'init_device': 'cpu'},
                      'teacher': {'init_device': 'mixed'}, 'distillation': {'temperature': 2.0}},
            'fsdp_config': {}, 'train_loader': {'name': 'composer_kd_precomputed'},
            'eval_loader': {'name': 'text'}}
    done = composer_kd_transform(ours)
    assert done['fsdp_config'] == {'sync_module_states': True}  # a nested mixed section: FSDP1 must broadcast
    assert done['train_loader']['teacher_temperature'] == 2.0 and 'teacher_temperature' not in done['eval_loader']
    cpu = {'model': {'name': 'composer_kd_distillation', 'student': {}, 'teacher': {}}, 'fsdp_config': {}}
    assert composer_kd_transform(cpu)['fsdp_config'] == {}


def test_the_precomputed_loader_refuses_plain_data_and_another_temperature(tiny_assets: Path, tiny_topk: Path) -> None:
    from transformers import AutoTokenizer

    from composer_kd.foundry.dataloaders import build_precomputed_dataloader
    tokenizer = AutoTokenizer.from_pretrained(tiny_assets / 'tokenizer')
    with pytest.raises(ConfigError, match='no precomputed teacher at'):
        build_precomputed_dataloader(tokenizer, 2, {'local': str(tiny_assets / 'data'), 'split': 'val',
                                                    'max_seq_len': 128})
    with pytest.raises(ConfigError, match=r'model.distillation.temperature=2: the precomputed teacher records'):
        build_precomputed_dataloader(tokenizer, 2, {'local': str(tiny_topk), 'split': 'val', 'max_seq_len': 128},
                                     teacher_temperature=2.0)


def test_composer_kd_train_refuses_a_foundry_config(capsys, tmp_path: Path, tiny_assets: Path) -> None:
    cfg = _foundry_config(tmp_path, tiny_assets)
    OmegaConf.save(cfg, tmp_path / 'foundry.yaml')
    assert_cli_error(capsys, ['train', str(tmp_path / 'foundry.yaml')],
                     'model.name: composer_kd_distillation: this is an LLM Foundry config')


def test_the_entry_points_load() -> None:
    from importlib.metadata import entry_points

    from composer.models import ComposerModel
    groups = {'llmfoundry_models': 1, 'llmfoundry_callbacks': 4, 'llmfoundry_dataloaders': 2,
              'llmfoundry_config_transforms': 1}
    for group, count in groups.items():
        ours = [e for e in entry_points(group=group) if e.value.startswith('composer_kd.')]
        assert len(ours) == count, (group, ours)
        for entry in ours:
            assert callable(entry.load())
    model = next(e for e in entry_points(group='llmfoundry_models') if e.name == 'composer_kd_distillation')
    assert issubclass(model.load(), ComposerModel)  # Foundry checks this before calling it


def test_the_tokens_loader_reads_what_composer_kds_loader_reads(tiny_assets: Path) -> None:
    from transformers import AutoTokenizer

    from composer_kd.data.tokens import build_token_dataloader
    from composer_kd.foundry.dataloaders import build_tokens_dataloader
    tokenizer = AutoTokenizer.from_pretrained(tiny_assets / 'tokenizer')
    dataset = {'local': str(tiny_assets / 'data'), 'split': 'val', 'max_seq_len': 128, 'shuffle': False}
    theirs = next(iter(build_tokens_dataloader(tokenizer, 4, dataset).dataloader))
    ours = next(iter(build_token_dataloader(dataset, 4, tokenizer.pad_token_id or 0).dataloader))
    assert theirs.keys() == ours.keys() and 'sample_id' in theirs
    assert all(torch.equal(theirs[k], ours[k]) for k in ours)

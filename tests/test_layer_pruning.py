"""Students cut from the teacher: every supported family keeps its logits bit for bit with all blocks, a subset equals
the teacher with the other blocks deleted by hand, tied embeddings stay tied and nothing is shared with the teacher,
other architectures are refused by name; ``composer-kd prune``; ``model.student.from_teacher`` in a run (the shipped
``tiny-cpu-pruned`` recipe, its refusals) and under ``init_device: mixed`` on 2 processes (``launcher``)."""

import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_cli_error, tiny_gpt2
from omegaconf import OmegaConf
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)

from composer_kd.cli import main
from composer_kd.config.paths import LocalPaths
from composer_kd.config.run_config import load_config
from composer_kd.errors import ConfigError
from composer_kd.model.layer_pruning import cut_model, family_of, select_layers
from composer_kd.run.train import check_run_config

REPO = Path(__file__).resolve().parents[1]
_SMALL = {'vocab_size': 64, 'hidden_size': 32, 'intermediate_size': 64, 'num_hidden_layers': 5,
          'num_attention_heads': 4, 'num_key_value_heads': 2, 'max_position_embeddings': 32}
CONFIGS = {
    'llama': lambda: LlamaConfig(**_SMALL),
    'llama-tied': lambda: LlamaConfig(**_SMALL, tie_word_embeddings=True),
    'mistral': lambda: MistralConfig(**_SMALL, sliding_window=4),
    # blocks 2-4 slide, 0-1 attend fully: the kept blocks must keep their own kind
    'qwen2': lambda: Qwen2Config(**_SMALL, use_sliding_window=True, sliding_window=4, max_window_layers=2),
    'qwen3': lambda: Qwen3Config(**_SMALL, head_dim=8, use_sliding_window=True, sliding_window=4, max_window_layers=3),
    'gpt2': lambda: GPT2Config(vocab_size=64, n_embd=32, n_layer=5, n_head=4, n_positions=32),
}


def _teacher(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(CONFIGS[kind](), attn_implementation='eager').eval()


def _ids() -> torch.Tensor:
    return torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))


def _by_hand(teacher: torch.nn.Module, kept: list[int]) -> torch.nn.Module:
    """The teacher with the other blocks deleted from its list (each block keeps its own settings)."""
    reference = copy.deepcopy(teacher)
    parent = reference.transformer if isinstance(reference, GPT2LMHeadModel) else reference.model
    name = 'h' if isinstance(reference, GPT2LMHeadModel) else 'layers'
    setattr(parent, name, torch.nn.ModuleList([getattr(parent, name)[i] for i in kept]))
    reference.config.num_hidden_layers = len(kept)
    return reference


@pytest.mark.parametrize('kind', sorted(CONFIGS))
def test_all_blocks_kept_is_the_teacher_bit_for_bit_and_a_subset_is_the_teacher_without_the_others(kind: str) -> None:
    teacher = _teacher(kind)
    ids = _ids()
    with torch.no_grad():
        want = teacher(ids).logits
        assert torch.equal(cut_model(teacher, range(5), attn_implementation='eager').eval()(ids).logits, want)
        kept = [0, 2, 4]
        student = cut_model(teacher, kept, attn_implementation='eager').eval()
        assert torch.equal(student(ids).logits, _by_hand(teacher, kept)(ids).logits)
    assert student.config.num_hidden_layers == 3
    assert student.config.composer_kd_pruning == {'kept_layers': kept, 'source_layers': 5}
    if kind in ('qwen2', 'qwen3'):  # the kept blocks' own attention kinds, and the count of leading full ones
        assert student.config.layer_types == [teacher.config.layer_types[i] for i in kept]
        assert student.config.max_window_layers == sum(1 for i in kept if i < teacher.config.max_window_layers)
        assert 'sliding_attention' in student.config.layer_types and 'full_attention' in student.config.layer_types
    tied = teacher.get_output_embeddings().weight is teacher.get_input_embeddings().weight
    assert (student.get_output_embeddings().weight is student.get_input_embeddings().weight) == tied
    teacher_storage = {p.untyped_storage().data_ptr() for p in teacher.parameters()}
    assert not teacher_storage & {p.untyped_storage().data_ptr() for p in student.parameters()}


def test_a_saved_student_is_a_plain_hugging_face_model(tmp_path: Path) -> None:
    teacher = _teacher('llama-tied')
    student = cut_model(teacher, [1, 3], dtype=torch.float64)
    student.save_pretrained(tmp_path / 'student')
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / 'student', torch_dtype=torch.float64,
                                                  attn_implementation='eager').eval()
    with torch.no_grad():
        assert torch.equal(loaded(_ids()).logits, student.eval()(_ids()).logits)
    assert loaded.config.composer_kd_pruning == {'kept_layers': [1, 3], 'source_layers': 5}
    # cut again: the record names the original's blocks
    assert cut_model(loaded, [1]).config.composer_kd_pruning == {'kept_layers': [3], 'source_layers': 5}


def test_other_architectures_are_refused_by_name() -> None:
    neox = GPTNeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64)
    with pytest.raises(ValueError, match='GPTNeoXForCausalLM cannot be cut .supported: GPT2LMHeadModel, '
                                         'LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM'):
        family_of(neox)
    with pytest.raises(ValueError, match='scale_attn_by_inverse_layer_idx is on'):
        cut_model(GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=32,
                                             scale_attn_by_inverse_layer_idx=True)), [1])


def test_which_blocks_every_k_keeps() -> None:
    assert select_layers(30, every=4) == [3, 7, 11, 15, 19, 23, 27]
    assert select_layers(30, every=4, keep_first=True, keep_last=True) == [0, 3, 7, 11, 15, 19, 23, 27, 29]
    assert select_layers(12, every=3, keep_last=True) == [2, 5, 8, 11]
    assert select_layers(30, layers=[0, 29]) == [0, 29]
    for kwargs, match in (({'layers': [3, 1]}, 'increasing'), ({'layers': [30]}, r'\[30\] out of range: the model '
                          r'has 30 blocks \(0-29\)'), ({'every': 31}, 'between 1 and'), ({}, 'give layers'),
                          ({'layers': [1], 'keep_last': True}, 'go with every')):
        with pytest.raises(ValueError, match=match):
            select_layers(30, **kwargs)


# -- composer-kd prune --------------------------------------------------------------------------------------------
def test_the_prune_command_writes_the_cut_student(tmp_path: Path, tiny_assets: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    teacher_dir = tmp_path / 'teacher'
    teacher = tiny_gpt2(n_layer=4, seed=3)
    teacher.save_pretrained(teacher_dir)
    for name in ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json'):
        (teacher_dir / name).write_bytes((tiny_assets / 'tokenizer' / name).read_bytes())
    assert main(['prune', str(teacher_dir), str(tmp_path / 'out'), '--every', '2', '--keep-first']) == 0
    assert '3 of the 4 blocks of GPT2LMHeadModel ([0, 1, 3])' in capsys.readouterr().out
    written = AutoModelForCausalLM.from_pretrained(tmp_path / 'out')
    want = cut_model(teacher, [0, 1, 3]).state_dict()
    assert sorted(written.state_dict()) == sorted(want)
    assert all(torch.equal(written.state_dict()[k], v) for k, v in want.items())
    assert (tmp_path / 'out' / 'tokenizer.json').is_file()
    assert_cli_error(capsys, ['prune', str(teacher_dir), str(tmp_path / 'out'), '--layers', '0'], 'is not empty')
    assert_cli_error(capsys, ['prune', str(teacher_dir), str(tmp_path / 'x'), '--layers', '0', '4'],
                     '--layers: layers [4] out of range: the model has 4 blocks (0-3)')
    neox = tmp_path / 'neox'
    GPTNeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4).save_pretrained(neox)
    assert_cli_error(capsys, ['prune', str(neox), str(tmp_path / 'y'), '--layers', '0'],
                     'teacher: GPTNeoXForCausalLM cannot be cut')


# -- model.student.from_teacher ------------------------------------------------------------------------------------
STUDENT = 'model.student'


@pytest.mark.parametrize('overrides,match', [
    ([f'{STUDENT}.from_teacher={{layers: [1]}}'], 'model.student.pretrained_model_name_or_path: a student cut from the '
     'teacher (from_teacher) takes its architecture and weights from it'),
    ([f'{STUDENT}=null', f'{STUDENT}.from_teacher={{layers: [1], every: 2}}'], 'give layers (the blocks to keep) or '
     'every'),
    ([f'{STUDENT}=null', f'{STUDENT}.from_teacher={{layers: [1, 0]}}'], 'layers=[1, 0] must be a non-empty '
     'increasing list'),
    ([f'{STUDENT}=null', f'{STUDENT}.from_teacher={{layers: [1], keep_last: true}}'], 'keep_first / keep_last go with '
     'every'),
    ([f'{STUDENT}=null', f'{STUDENT}.from_teacher={{every: 2}}', 'model.teacher={precomputed: true}'],
     'model.student.from_teacher needs a teacher model to cut'),
    ([f'{STUDENT}=null', f'{STUDENT}.from_teacher={{every: 2}}', f'{STUDENT}.init_device=meta', 'fsdp_config={}'],
     'model.student.init_device: meta builds empty weights'),
])
def test_the_config_refuses_what_cannot_be_cut(overrides: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(match)):  # as checked for 2 GPUs (init_device: meta needs them)
        check_run_config(load_config(str(REPO / 'yamls' / 'tiny-cpu.yaml'), overrides), world_size=2, gpu=True,
                         paths=LocalPaths(elsewhere=True))
    ensemble = [f'{STUDENT}=null', f'{STUDENT}.from_teacher={{every: 2}}']
    with pytest.raises(ConfigError, match='this run has an ensemble .model.teachers.; name the model to cut'):
        check_run_config(load_config(str(REPO / 'yamls' / 'tiny-cpu-ensemble.yaml'), ensemble), world_size=1,
                         gpu=False, paths=LocalPaths(elsewhere=True))


def test_from_teacher_can_cut_another_checkpoint(tiny_assets: Path) -> None:
    """``from_teacher.pretrained_model_name_or_path``: the student is cut from that checkpoint, not the run's teacher
    (with an ensemble too); float32 unless ``torch_dtype`` says otherwise."""
    from transformers import AutoTokenizer

    from composer_kd.builders.models import build_distillation_model
    tokenizer = AutoTokenizer.from_pretrained(tiny_assets / 'tokenizer')
    teacher = {'pretrained_model_name_or_path': str(tiny_assets / 'teacher')}
    cut = {'every': 1, 'pretrained_model_name_or_path': str(tiny_assets / 'teacher_b')}
    for teachers in ({'teacher': teacher}, {'teachers': [teacher, teacher]}):
        model = build_distillation_model({'student': {'from_teacher': cut, 'torch_dtype': 'float64'}, **teachers},
                                         tokenizer)
        want = cut_model(AutoModelForCausalLM.from_pretrained(tiny_assets / 'teacher_b'), [0], dtype=torch.float64)
        got = model.model.state_dict()
        assert sorted(got) == sorted(want.state_dict()) and all(torch.equal(got[k], v)
                                                                for k, v in want.state_dict().items())


def _pruned_config(tmp_path: Path, tiny_assets: Path, **edits) -> Path:
    cfg = OmegaConf.load(REPO / 'yamls' / 'tiny-cpu-pruned.yaml')
    cfg.variables.assets = str(tiny_assets)
    cfg.save_folder = str(tmp_path / 'checkpoints')
    for key, value in edits.items():
        OmegaConf.update(cfg, key, value, force_add=True)
    OmegaConf.save(cfg, tmp_path / 'pruned.yaml')
    return tmp_path / 'pruned.yaml'


def test_the_pruned_recipe_trains_and_exports_a_plain_student(tmp_path: Path, tiny_assets: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    config = _pruned_config(tmp_path, tiny_assets, max_duration='2ba', eval_interval='2ba',
                            eval_subset_num_batches=1, save_interval='2ba', console_log_interval='1ba')
    assert main(['train', str(config)]) == 0
    logged = ''.join(capsys.readouterr())  # Composer's console logger
    assert 'loss/train/hidden' in logged and 'TeacherTop1Agreement' in logged
    assert main(['export', str(tmp_path / 'checkpoints' / 'ep0-ba2-rank0.pt'), str(tmp_path / 'student')]) == 0
    student = AutoModelForCausalLM.from_pretrained(tmp_path / 'student')
    recipe = OmegaConf.load(REPO / 'yamls' / 'tiny-cpu-pruned.yaml')
    kept = list(recipe.model.student.from_teacher.layers)
    assert student.config.n_layer == len(kept) and student.config.composer_kd_pruning['kept_layers'] == kept
    assert not [k for k in load_file(tmp_path / 'student' / 'model.safetensors') if 'projection' in k]
    # blocks out of range are refused once the teacher's depth is known
    assert_cli_error(capsys, ['train', str(config), 'model.student.from_teacher.layers=[0,2]'],
                     'model.student.from_teacher.layers=[0, 2]: layers [2] out of range: the model has 2 blocks')


@pytest.mark.slow
@pytest.mark.launcher
def test_mixed_init_on_two_processes_cuts_the_one_process_student(tmp_path: Path, tiny_assets: Path) -> None:
    """FSDP2, ``init_device: mixed``: rank 0 loads the teacher and cuts the student, rank 1 builds both on meta from
    the cut config; after a step at lr 0 the exported student is the 1-process cut, bit for bit."""
    config = _pruned_config(tmp_path, tiny_assets, max_duration='1ba', save_interval='1ba', eval_loader=None,
                            **{'optimizer.lr': 0.0, 'model.teacher.init_device': 'mixed',
                               'model.student.init_device': 'mixed'})
    launcher = [sys.executable, '-m', 'composer.cli.launcher', '-n', '2', '--stdout', str(tmp_path / 'rank{rank}.out'),
                '--stderr', str(tmp_path / 'rank{rank}.err'), '-m', 'composer_kd']
    proc = subprocess.run([*launcher, 'train', str(config), 'fsdp_config={state_dict_type: sharded}',
                           'log_to_console=false'], capture_output=True, text=True, timeout=600,
                          env={**os.environ, 'FSDP_VERSION': '2'})
    errors = ''.join(p.read_text()[-3000:] for p in tmp_path.glob('rank*.err'))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + errors
    assert main(['export', str(tmp_path / 'checkpoints' / 'ep0-ba1'), str(tmp_path / 'student')]) == 0
    got = load_file(tmp_path / 'student' / 'model.safetensors')
    kept = list(OmegaConf.load(REPO / 'yamls' / 'tiny-cpu-pruned.yaml').model.student.from_teacher.layers)
    want = cut_model(AutoModelForCausalLM.from_pretrained(tiny_assets / 'teacher'), kept).state_dict()
    assert sorted(got) == sorted(k for k in want if k != 'lm_head.weight')  # tied: saved once
    for name, weight in got.items():
        assert torch.equal(weight, want[name]), name

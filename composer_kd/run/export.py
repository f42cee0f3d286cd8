"""``composer-kd export``: the student of a Composer checkpoint → a Hugging Face ``save_pretrained`` folder.

The checkpoint embeds the student's config and tokenizer (``HuggingFaceModel.get_metadata``) and holds the
student's weights under ``model.*`` (the teacher is never saved), so no other input is needed.
"""

import os
import tempfile
from typing import Any

import torch
from composer.models import HuggingFaceModel
from composer.models.huggingface import get_hf_config_from_composer_state_dict
from transformers import AutoModelForCausalLM

from composer_kd.errors import ConfigError

__all__ = ['export_student', 'load_checkpoint']

_STUDENT_PREFIX = 'model.'


def load_checkpoint(path: str) -> dict[str, Any]:
    """Loads a monolithic (``.pt``) or sharded (folder with ``.metadata``) Composer checkpoint onto the CPU."""
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, '.metadata')):
            raise ConfigError(f'checkpoint: {path} is a folder without a sharded checkpoint (.metadata) in it')
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
        with tempfile.TemporaryDirectory() as tmp:
            dcp_to_torch_save(path, os.path.join(tmp, 'full.pt'))
            return torch.load(os.path.join(tmp, 'full.pt'), map_location='cpu', weights_only=False)
    if not os.path.isfile(path):
        raise ConfigError(f'checkpoint: no such file or folder: {path}')
    return torch.load(path, map_location='cpu', weights_only=False)


def export_student(checkpoint: str, out_dir: str, overwrite: bool = False) -> str:
    """Writes the checkpoint's student (weights, config, tokenizer) to ``out_dir``; returns ``out_dir``.

    Raises:
        ConfigError: for a missing checkpoint, one not written by a ``DistillationModel``/``HuggingFaceModel``,
            or a non-empty ``out_dir`` without ``overwrite``.
    """
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise ConfigError(f'out_dir: {out_dir} is not empty (pass --overwrite to write into it)')
    state = load_checkpoint(checkpoint)
    hf_state = state.get('state', {}).get('integrations', {}).get('huggingface')
    if hf_state is None:
        raise ConfigError(f'checkpoint: {checkpoint} has no Hugging Face metadata (not a composer-kd checkpoint)')
    config = get_hf_config_from_composer_state_dict(state)
    student = AutoModelForCausalLM.from_config(config)
    weights = {
        k[len(_STUDENT_PREFIX):]: v for k, v in state['state']['model'].items() if k.startswith(_STUDENT_PREFIX)
    }
    missing, unexpected = student.load_state_dict(weights, strict=False)
    missing = [k for k in missing if k not in (getattr(student, '_tied_weights_keys', None) or ())]
    if missing or unexpected:
        raise ConfigError(f'checkpoint: student weights do not fit the saved config (missing {missing[:3]}, '
                          f'unexpected {unexpected[:3]})')
    student.tie_weights()
    os.makedirs(out_dir, exist_ok=True)
    student.save_pretrained(out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = HuggingFaceModel.load_huggingface_tokenizer_from_saved_state(hf_state, tokenizer_save_dir=tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return out_dir

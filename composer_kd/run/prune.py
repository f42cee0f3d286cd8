"""``composer-kd prune``: write a student cut from a model — its architecture with only some of its blocks, their weights
copied (``model/layer_pruning.py``) — as a Hugging Face folder, once, to inspect it or to train it as any student.

A run can instead cut the student when it starts (``model.student.from_teacher``); both make the same model.
"""

import os
from typing import Any, Optional, Sequence

from transformers import AutoConfig, AutoModelForCausalLM

from composer_kd.builders.models import model_tokenizer
from composer_kd.data.staging import staged_folder
from composer_kd.errors import ConfigError
from composer_kd.model.layer_pruning import cut_model, family_of, select_layers

__all__ = ['prune_model']


def _load_config(source: str) -> Any:
    try:
        return AutoConfig.from_pretrained(os.path.expanduser(source))
    except (OSError, ValueError) as e:  # not a model folder or Hub id Hugging Face can read
        raise ConfigError(f'teacher: cannot read a model config from {source!r}: {str(e).splitlines()[0]}') from e


def prune_model(source: str, out: str, layers: Optional[Sequence[int]] = None, every: Optional[int] = None,
                keep_first: bool = False, keep_last: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Writes the blocks ``layers`` (or every ``every``-th, see ``select_layers``) of the model at ``source`` to
    ``out``: weights (safetensors, in the source's dtype), config, generation config and the source's tokenizer.

    Args:
        source (str): a Hugging Face model folder or Hub id (Llama, Mistral, Qwen2, Qwen3 or GPT-2).
        out (str): the output folder; written whole or not at all.
        layers (Sequence[int], optional): the blocks to keep, increasing.
        every (int, optional): keep blocks k−1, 2k−1, …
        keep_first (bool): with ``every``, also keep block 0. Default: ``False``.
        keep_last (bool): with ``every``, also keep the last block. Default: ``False``.
        overwrite (bool): replace a non-empty ``out``. Default: ``False``.

    Returns:
        dict: ``architecture``, ``kept_layers``, ``source_layers``, ``parameters`` and ``source_parameters``.

    Raises:
        ConfigError: for an unreadable source, an architecture that cannot be cut (named), blocks out of range, or a
            non-empty ``out`` without ``overwrite``.
    """
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise ConfigError(f'out: {out} is not empty (pass --overwrite to replace it)')
    config = _load_config(source)
    try:
        family = family_of(config)
    except ValueError as e:
        raise ConfigError(f'teacher: {e}') from e
    depth = getattr(config, family.depth)
    try:
        kept = select_layers(depth, layers, every, keep_first, keep_last)
    except ValueError as e:
        raise ConfigError(f'--{"layers" if layers is not None else "every"}: {e}') from e
    model = AutoModelForCausalLM.from_pretrained(os.path.expanduser(source), torch_dtype='auto')
    student = cut_model(model, kept)
    with staged_folder(out) as staging:
        student.save_pretrained(staging, safe_serialization=True)
        tokenizer = model_tokenizer(source, {})  # None for a model folder without one: the student has none either
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
    return {
        'architecture': type(model).__name__,
        'kept_layers': kept,
        'source_layers': depth,
        'parameters': sum(p.numel() for p in student.parameters()),
        'source_parameters': sum(p.numel() for p in model.parameters()),
    }

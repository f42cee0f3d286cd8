"""FSDP wrap, initialisation and activation-checkpointing policies for Hugging Face children of a Composer model.

Composer shards every direct child of the ``ComposerModel`` as its own FSDP root and, inside it, asks the
child's ``fsdp_wrap_fn`` / ``activation_checkpointing_fn`` attributes which modules become units. Setting
them on the HF models (as LLM Foundry does) wraps each transformer block; the frozen teacher is sharded the
same way, has no optimizer state and is never activation-checkpointed (it runs under ``no_grad``).

Weights built on ``meta`` (``init_device: meta``, or ``mixed`` on ranks > 0) are initialised module by module
once sharded through ``param_init_fn``: FSDP2 (``composer/distributed/param_init.py``) takes the nearest one up
the tree, FSDP1 (``dist_strategy.py``) only the wrapped child's own (``FrozenTeachers.param_init_fn`` dispatches).
"""

import functools

import torch
from transformers import PreTrainedModel

from composer_kd.model.rotary import keep_rotary_float32

__all__ = ['is_sharded', 'prepare_for_fsdp']


def _is_block(block_names: frozenset[str], module: torch.nn.Module) -> bool:
    return type(module).__name__ in block_names


def _never(module: torch.nn.Module) -> bool:
    del module
    return False


def prepare_for_fsdp(model: PreTrainedModel, *, frozen: bool) -> None:
    """Readies a Hugging Face model for Composer's FSDP, in place: ``fsdp_wrap_fn`` and
    ``activation_checkpointing_fn`` from its ``_no_split_modules``, ``param_init_fn`` (Hugging Face's own
    ``_init_weights``) for weights built on ``meta``, and RoPE tables kept in float32 whatever FSDP's mixed
    precision casts (``model/rotary.py``).

    Args:
        model (PreTrainedModel): a Hugging Face model, modified in place.
        frozen (bool): a model that takes no gradient is never activation-checkpointed.
    """
    block_names = frozenset(getattr(model, '_no_split_modules', None) or ())
    is_block = functools.partial(_is_block, block_names)
    model.fsdp_wrap_fn = is_block
    model.activation_checkpointing_fn = _never if frozen else is_block
    model.param_init_fn = model._init_weights
    keep_rotary_float32(model)


def is_sharded(module: torch.nn.Module) -> bool:
    """Whether FSDP (1 or 2) wraps ``module`` or any module in it (then gathered weights live only inside calls)."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    return any(isinstance(m, (FSDPModule, FullyShardedDataParallel)) for m in module.modules())

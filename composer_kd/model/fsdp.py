"""FSDP wrap and activation-checkpointing policies for Hugging Face children of a Composer model.

Composer shards every direct child of the ``ComposerModel`` as its own FSDP root and, inside it, asks the
child's ``fsdp_wrap_fn`` / ``activation_checkpointing_fn`` attributes which modules become units. Setting
them on the HF models (as LLM Foundry does) wraps each transformer block; the frozen teacher is sharded the
same way, has no optimizer state and is never activation-checkpointed (it runs under ``no_grad``).
"""

import functools

import torch
from transformers import PreTrainedModel

__all__ = ['is_sharded', 'prepare_for_fsdp']


def _is_block(block_names: frozenset[str], module: torch.nn.Module) -> bool:
    return type(module).__name__ in block_names


def _never(module: torch.nn.Module) -> bool:
    del module
    return False


def prepare_for_fsdp(model: PreTrainedModel, *, frozen: bool) -> None:
    """Sets ``fsdp_wrap_fn`` and ``activation_checkpointing_fn`` on ``model`` from its ``_no_split_modules``.

    Args:
        model (PreTrainedModel): a Hugging Face model, modified in place.
        frozen (bool): a model that takes no gradient is never activation-checkpointed.
    """
    block_names = frozenset(getattr(model, '_no_split_modules', None) or ())
    is_block = functools.partial(_is_block, block_names)
    model.fsdp_wrap_fn = is_block
    model.activation_checkpointing_fn = _never if frozen else is_block


def is_sharded(module: torch.nn.Module) -> bool:
    """Whether FSDP (1 or 2) wraps ``module`` or any module in it (then gathered weights live only inside calls)."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    return any(isinstance(m, (FSDPModule, FullyShardedDataParallel)) for m in module.modules())

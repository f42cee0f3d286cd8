"""The ``ComposerModel`` of a ``State``, without Composer's DDP wrapper (FSDP leaves the root unwrapped)."""

from typing import Any

from composer.core import State
from torch.nn.parallel import DistributedDataParallel

__all__ = ['composer_model']


def composer_model(state: State) -> Any:
    """``state.model``, or the model inside it when Composer wrapped it in ``DistributedDataParallel``."""
    return state.model.module if isinstance(state.model, DistributedDataParallel) else state.model

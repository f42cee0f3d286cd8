"""Data: token MDS datasets and batches, ``prepare-data``, and all-at-once folder writes.

The re-exported names load on first use (PEP 562), so a spawned ``prepare-data`` worker that imports
``composer_kd.data.tokenize_worker`` does not pay for torch and Streaming.
"""

from typing import TYPE_CHECKING

from composer_kd.lazy_exports import lazy_exports

_EXPORTS = {
    name: 'composer_kd.data.tokens'
    for name in ('TokenDataset', 'batch_labels', 'build_token_dataloader', 'collate_tokens', 'count_tokens',
                 'token_data_spec')
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # what type checkers and IDEs see
    from composer_kd.data.tokens import TokenDataset as TokenDataset
    from composer_kd.data.tokens import batch_labels as batch_labels
    from composer_kd.data.tokens import build_token_dataloader as build_token_dataloader
    from composer_kd.data.tokens import collate_tokens as collate_tokens
    from composer_kd.data.tokens import count_tokens as count_tokens
    from composer_kd.data.tokens import token_data_spec as token_data_spec


__getattr__, __dir__ = lazy_exports(globals(), _EXPORTS)

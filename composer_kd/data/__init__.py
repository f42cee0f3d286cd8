"""Data: token MDS datasets and batches, ``prepare-data``, and all-at-once folder writes."""

from composer_kd.data.tokens import TokenDataset as TokenDataset
from composer_kd.data.tokens import batch_labels as batch_labels
from composer_kd.data.tokens import build_token_dataloader as build_token_dataloader
from composer_kd.data.tokens import collate_tokens as collate_tokens
from composer_kd.data.tokens import count_tokens as count_tokens
from composer_kd.data.tokens import token_data_spec as token_data_spec

__all__ = [
    'TokenDataset', 'batch_labels', 'build_token_dataloader', 'collate_tokens', 'count_tokens', 'token_data_spec'
]

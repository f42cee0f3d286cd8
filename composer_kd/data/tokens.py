"""Token data: Streaming MDS shards with a ``tokens`` column → causal-LM batches and a token-exact ``DataSpec``.

The shard layout is LLM Foundry's ``concat_tokens`` layout (``columns={'tokens': 'ndarray:int32'}``), so
datasets its converters prepared work as they are. A dataset written by ``precompute-teacher`` adds the
teacher's top-k columns (``teacher_topk.py``); its batches then carry them too.
"""

import functools
import os
from typing import Any, Iterator, Mapping, Optional, Sequence

import numpy as np
import torch
from composer.core import DataSpec
from streaming import StreamingDataset
from streaming.base.dataset import _ShardState
from torch.utils.data import DataLoader

from composer_kd.data.shard_checks import check_mds_split
from composer_kd.data.streaming_resources import raise_open_file_limit, release_shared_memory
from composer_kd.data.teacher_topk import TEACHER_IDS, decode_teacher, pad_teacher
from composer_kd.errors import ConfigError, DataError

__all__ = [
    'TokenDataset', 'batch_labels', 'collate_tokens', 'token_data_spec', 'count_tokens', 'build_token_dataloader'
]

TOKENS_COLUMN = 'tokens'


class TokenDataset(StreamingDataset):
    """A ``StreamingDataset`` over MDS shards with a ``tokens`` column, truncated to ``max_seq_len``.

    Samples of a precomputed teacher also give ``teacher_topk_ids`` ``(T, K)``, ``teacher_topk_logprobs``
    ``(T, K)`` and ``teacher_rest_logprob`` ``(T,)`` at ``teacher_temperature``.

    Args:
        max_seq_len (int): tokens kept from each sample.
        teacher_temperature (float): the temperature whose recorded rest mass a precomputed teacher's samples
            give. Default: ``1.0``.
        **kwargs: passed to ``streaming.StreamingDataset`` (``local``, ``remote``, ``split``, ``shuffle``,
            ``batch_size``, ...).
    """

    def __init__(self, max_seq_len: int, teacher_temperature: float = 1.0, vocab_size: Optional[int] = None,
                 **kwargs: Any) -> None:
        raise_open_file_limit()  # every StreamingDataset keeps ~60 descriptors until the process exits
        local, split = kwargs.get('local'), kwargs.get('split')
        if local and os.path.isfile(os.path.join(local, split or '', 'index.json')):
            check_mds_split(local, split, kwargs.get('remote'))  # name a bad index or shard before Streaming reads
        super().__init__(**kwargs)
        self.max_seq_len = max_seq_len
        self.teacher_temperature = teacher_temperature
        self.vocab_size = vocab_size
        self._where = os.path.join(kwargs.get('local') or kwargs.get('remote') or '', kwargs.get('split') or '')
        self._shard_error: Optional[str] = None

    def prepare_shard(self, shard_id: int, blocking: bool = True) -> int:
        """Streaming's shard download/decompression, remembering why a shard failed (it runs in a thread).

        Streaming 0.13 leaves a shard that failed in the PREPARING state, and every reader waiting for it spins
        forever; it is set back to REMOTE, so a waiter stops waiting and fails on the shard itself (Streaming's
        private ``_shard_states``; tests/test_dependency_internals.py names it if an upgrade moves it).
        """
        try:
            return super().prepare_shard(shard_id, blocking)
        except Exception as e:
            self._shard_states[shard_id] = _ShardState.REMOTE
            shard = self.shards[shard_id]
            name = (shard.zip_data or shard.raw_data).basename
            self._shard_error = (f'{os.path.join(self._where, name)}: shard cannot be prepared ({type(e).__name__}: '
                                 f'{str(e).splitlines()[0][:120] if str(e) else ""}); is it corrupt?')
            raise

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        # When a shard fails in Streaming's thread, its loop just ends (an empty epoch) and the next one raises a
        # RuntimeError pointing at a traceback: raise the named error instead, at once.
        try:
            yield from super().__iter__()
        except RuntimeError as e:
            if self._shard_error is not None:
                raise DataError(self._shard_error) from e
            raise
        if self._shard_error is not None:
            raise DataError(self._shard_error)

    def on_exception(self, future: Any) -> None:
        """Streaming re-raises a thread's error from a future callback (a traceback in the log); when the error is
        a shard's, stop as Streaming would and let ``__getitem__`` name the shard instead."""
        if future.exception() is not None and self._shard_error is not None:
            self._event.set()
            return
        super().on_exception(future)

    def __del__(self) -> None:
        # Unreachable: give back the shared memory Streaming would otherwise hold until the process exits.
        super().__del__()
        if hasattr(self, '_locals_shm'):
            release_shared_memory(self)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        try:
            sample = super().__getitem__(index)
        except Exception as e:  # a shard that decodes to garbage: name it here, not deep in a worker
            if self._shard_error is not None:
                raise DataError(self._shard_error) from e
            raise DataError(f'{self._where}: sample {index} cannot be read ({type(e).__name__}: '
                            f'{str(e).splitlines()[0][:120] if str(e) else ""}); its shard may be corrupt') from e
        if TOKENS_COLUMN not in sample:
            raise DataError(f'{self._where}: MDS samples need a {TOKENS_COLUMN!r} column (ndarray of token ids); '
                            f'this dataset has {sorted(sample)}')
        tokens = np.asarray(sample[TOKENS_COLUMN])
        if len(tokens) > self.max_seq_len:
            raise DataError(f'{self._where}: sample {index} has {len(tokens)} tokens, more than max_seq_len='
                            f'{self.max_seq_len} (prepare the data at this length, or raise max_seq_len)')
        if len(tokens) and (tokens.min() < 0 or (self.vocab_size is not None and tokens.max() >= self.vocab_size)):
            bad = int(tokens.min()) if tokens.min() < 0 else int(tokens.max())
            raise DataError(f'{self._where}: sample {index} holds token id {bad}, outside the tokenizer\'s '
                            f'{self.vocab_size} ids (data prepared with another tokenizer?)')
        # sample_id: the sample's global index in the dataset, stable across processes, shuffles and resumes.
        item = {'input_ids': torch.from_numpy(tokens.astype(np.int64)), 'sample_id': torch.tensor(index)}
        teacher = decode_teacher(sample, self.max_seq_len, self.teacher_temperature)
        return item if teacher is None else {**item, **teacher}


def collate_tokens(samples: Sequence[Mapping[str, torch.Tensor]], pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pads ``input_ids`` to the longest sample: ``input_ids``, ``attention_mask`` and ``labels`` ``(B, T)``,
    and ``sample_id`` ``(B,)`` when the samples carry it (``TokenDataset``'s do).

    Labels are the input ids with ``-100`` on padding. Masking by position (not by token value) keeps every
    real EOS in the loss even when the pad token is the EOS token. A precomputed teacher's tensors are padded
    alongside (``teacher_topk.pad_teacher``).
    """
    length = max(len(s['input_ids']) for s in samples)
    input_ids = torch.full((len(samples), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), length), dtype=torch.long)
    for row, sample in enumerate(samples):
        ids = sample['input_ids']
        input_ids[row, :len(ids)] = ids
        attention_mask[row, :len(ids)] = 1
    batch = {'input_ids': input_ids, 'attention_mask': attention_mask}
    batch['labels'] = batch_labels(batch)
    if 'sample_id' in samples[0]:
        batch['sample_id'] = torch.stack([torch.as_tensor(s['sample_id'], dtype=torch.long) for s in samples])
    if TEACHER_IDS in samples[0]:
        batch.update(pad_teacher(samples, length))
    return batch


def batch_labels(batch: Mapping[str, Any]) -> torch.Tensor:
    """``labels`` of a causal-LM batch: as given, else the input ids with -100 where ``attention_mask`` is 0.

    The loss and the token counter both read labels through here, so they count the same tokens.
    """
    if batch.get('labels') is not None:
        return batch['labels']
    mask = batch.get('attention_mask')
    return batch['input_ids'] if mask is None else batch['input_ids'].masked_fill(mask == 0, -100)


def count_tokens(batch: Mapping[str, Any]) -> dict[str, int]:
    """Composer token counter: ``total`` real tokens and ``loss_generating`` = N of ``distillation_loss``.

    ``loss_generating`` counts shifted targets that are not -100 (``labels[:, 1:]``), exactly the
    denominator of the loss, so ``accumulate_train_batch_on_tokens`` makes every step exact.
    """
    input_ids = batch['input_ids']
    mask = batch.get('attention_mask')
    total = int(mask.sum()) if mask is not None else input_ids.numel()
    return {'total': total, 'loss_generating': int((batch_labels(batch)[:, 1:] != -100).sum())}


def token_data_spec(dataloader: DataLoader | Any) -> DataSpec:
    """Wraps a causal-LM dataloader in a ``DataSpec`` whose token counter matches the loss (see ``count_tokens``)."""
    return DataSpec(dataloader, get_num_tokens_in_batch=count_tokens)


def build_token_dataloader(dataset: Mapping[str, Any],
                           batch_size: int,
                           pad_token_id: int,
                           teacher_temperature: float = 1.0,
                           drop_last: bool = True,
                           num_workers: int = 0,
                           pin_memory: bool = False,
                           prefetch_factor: Optional[int] = None,
                           persistent_workers: bool = False,
                           timeout: float = 0,
                           vocab_size: Optional[int] = None,
                           key: Optional[str] = None) -> DataSpec:
    """Builds the ``DataSpec`` for an LLM Foundry-style ``*_loader`` section.

    Args:
        dataset (Mapping): ``max_seq_len`` plus ``StreamingDataset`` arguments (``local``, ``remote``,
            ``split``, ``shuffle``, ``shuffle_seed``, ...).
        batch_size (int): samples per device batch.
        pad_token_id (int): id used to pad short samples.
        teacher_temperature (float): for a precomputed teacher, the temperature whose recorded rest mass the
            batches carry. Default: ``1.0``.
        drop_last, num_workers, pin_memory, prefetch_factor, persistent_workers, timeout: ``DataLoader`` args.
        vocab_size (int, optional): token ids must be below it (the tokenizer's length); checked per sample.
        key (str, optional): the config section of this loader (``train_loader``), named in errors.

    Raises:
        ConfigError: when there is neither a local split with an ``index.json`` nor a remote to fetch it from, no
            sample, or an argument Streaming refuses.
        DataError: for a bad index or shard (``shard_checks.check_mds_split``, run by ``TokenDataset``), at
            build; for a bad sample, when it is read.
    """
    kwargs = dict(dataset)
    max_seq_len = kwargs.pop('max_seq_len')
    local, remote, split = kwargs.get('local'), kwargs.get('remote'), kwargs.get('split')
    where = f'{key}: ' if key else ''
    if remote is None and 'streams' not in kwargs:
        index = os.path.join(local or '', split or '', 'index.json')
        if not os.path.isfile(index):
            raise ConfigError(f'{where}no MDS dataset at local={local!r} split={split!r} (missing {index}); '
                              'make one with `composer-kd prepare-data`')
    try:
        dset = TokenDataset(max_seq_len=max_seq_len, teacher_temperature=teacher_temperature, batch_size=batch_size,
                            vocab_size=vocab_size, **kwargs)
    except DataError as e:  # a bad index or shard, named by its file: say which loader reads it too
        raise DataError(f'{where}{e}') from e
    except ConfigError:
        raise
    except ValueError as e:  # StreamingDataset's checks of its arguments
        raise ConfigError(f'{where}{str(e).splitlines()[0]}') from e
    if len(dset) == 0:
        raise ConfigError(f'{where}the MDS dataset at local={local!r} split={split!r} has no samples')
    workers = num_workers > 0
    loader = DataLoader(dset,
                        batch_size=batch_size,
                        collate_fn=functools.partial(collate_tokens, pad_token_id=pad_token_id),
                        drop_last=drop_last,
                        num_workers=num_workers,
                        pin_memory=pin_memory,
                        prefetch_factor=prefetch_factor if workers else None,
                        persistent_workers=persistent_workers and workers,
                        timeout=timeout)
    return token_data_spec(loader)

"""The precomputed-teacher format: MDS columns, the two log-prob encodings, the metadata file, batch keys.

Shapes: T sequence length (of one sample), K entries kept per position, V vocabulary.

Each MDS sample of a precomputed teacher holds (no pickle anywhere; ``ndarray`` encodings only):

* ``tokens`` ``(T,)``: the sample's token ids, in the smallest unsigned type that holds V;
* ``sample_index``: its index in the source dataset;
* ``teacher_topk_ids`` ``(T, K)``: the teacher's K most likely next tokens at every position, most likely
  first, same unsigned type;
* the K log-probabilities at temperature 1, in one of two encodings:

  - ``float16``: ``teacher_topk_logprobs`` ``(T, K)`` float16 (relative error ≤ 2⁻¹¹ of each log-prob);
  - ``uint8``: ``teacher_topk_uint8`` ``(T, K − 1)``: the probability of entries 2..K *relative to the
    top one*, ``p(i) / p(1)``, cube-rooted and scaled to 0..255 (code 0 decodes to (0.25/255)³). The cube root
    spends the 256 levels where the mass is (a ratio of 0.5 is kept to ±0.8%, 0.01 to ±3%); the top entry is
    the reference and is not stored; the absolute values come back from the recorded rest mass;

* ``teacher_rest_logprob_t{T}`` ``(T,)`` float16, for each recorded temperature (1 always): the log of the
  teacher's probability mass outside the K ids at that temperature, computed from the full logits.

Beside ``index.json`` of each split, ``teacher_topk.json`` records the teacher, the tokenizer's fingerprint,
V, K, the encoding, ``max_seq_len``, the temperatures, the source dataset and the counts.
"""

import hashlib
import json
import math
import os
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from composer_kd.config.precompute_config import ENCODINGS
from composer_kd.data.json_files import read_json, remote_json
from composer_kd.losses.topk import TopKTeacher

__all__ = [
    'ENCODINGS', 'METADATA_FILE', 'TEACHER_IDS', 'TEACHER_LOGPROBS', 'TEACHER_REST', 'TOKENS', 'SAMPLE_INDEX',
    'decode_teacher', 'encode_sample', 'id_dtype', 'mds_columns', 'read_metadata', 'rest_column', 'same_teacher',
    'teacher_fingerprint', 'tokenizer_fingerprint', 'topk_teacher_from_batch', 'pad_teacher'
]

FORMAT_NAME = 'composer-kd teacher top-k'
FORMAT_VERSION = 1
METADATA_FILE = 'teacher_topk.json'

TOKENS = 'tokens'
SAMPLE_INDEX = 'sample_index'
_IDS_COLUMN = 'teacher_topk_ids'
_FLOAT16_COLUMN = 'teacher_topk_logprobs'
_UINT8_COLUMN = 'teacher_topk_uint8'

# Batch keys (what the collator emits; ``topk_teacher_from_batch`` decodes them for DistillationModel).
TEACHER_IDS = 'teacher_topk_ids'  # int32 (B, T, K)
TEACHER_LOGPROBS = 'teacher_topk_logprobs'  # float16 (B, T, K), the float16 encoding
TEACHER_CODES = 'teacher_topk_uint8'  # uint8 (B, T, K − 1), the uint8 encoding
TEACHER_REST = 'teacher_rest_logprob'  # float16 (B, T), at the run's temperature
TEACHER_REST_T1 = 'teacher_rest_logprob_t1'  # float16 (B, T), uint8 encoding at a temperature other than 1

_CODE_ZERO = 0.25  # code 0 decodes to ((0.25 / 255)^3) × p(1): small, never exactly 0


def rest_column(temperature: float) -> str:
    """The MDS column of the log rest mass at ``temperature`` (e.g. ``teacher_rest_logprob_t2``)."""
    return f'teacher_rest_logprob_t{float(temperature):g}'


def id_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer type that holds every id of a ``vocab_size`` vocabulary."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.uint64)


def mds_columns(vocab_size: int, encoding: str, temperatures: Sequence[float]) -> dict[str, str]:
    """``MDSWriter`` columns of a precomputed teacher."""
    ids = f'ndarray:{id_dtype(vocab_size).name}'
    columns = {TOKENS: ids, SAMPLE_INDEX: 'int64', _IDS_COLUMN: ids}
    columns[_FLOAT16_COLUMN if encoding == 'float16' else _UINT8_COLUMN] = f'ndarray:{encoding}'
    for temperature in temperatures:
        columns[rest_column(temperature)] = 'ndarray:float16'
    return columns


def encode_sample(tokens: np.ndarray, sample_index: int, ids: np.ndarray, logprobs: np.ndarray,
                  rest: Mapping[float, np.ndarray], vocab_size: int, encoding: str) -> dict[str, Any]:
    """One MDS sample from float32 top-K ``logprobs`` ``(T, K)`` (sorted, most likely first), ``ids`` ``(T, K)``
    and the log rest mass ``(T,)`` per temperature."""
    dtype = id_dtype(vocab_size)
    sample = {TOKENS: tokens.astype(dtype), SAMPLE_INDEX: int(sample_index), _IDS_COLUMN: ids.astype(dtype)}
    if encoding == 'float16':
        sample[_FLOAT16_COLUMN] = logprobs.astype(np.float16)
    else:
        ratios = np.exp((logprobs[:, 1:] - logprobs[:, :1]) / 3.0)  # (p(i) / p(1))^(1/3) in [0, 1]
        sample[_UINT8_COLUMN] = np.rint(ratios * 255.0).astype(np.uint8)
    for temperature, values in rest.items():
        sample[rest_column(temperature)] = values.astype(np.float16)
    return sample


def decode_teacher(sample: Mapping[str, Any], max_seq_len: int, temperature: float) -> Optional[dict[str, Any]]:
    """One sample's teacher columns as tensors for the batch, cut to ``max_seq_len`` and still encoded (they
    are decoded batch-wise, on the device, by ``topk_teacher_from_batch``); None when it has no teacher.

    Raises:
        ValueError: if the rest mass at ``temperature`` was not recorded.
    """
    if _IDS_COLUMN not in sample:
        return None
    column = rest_column(temperature)
    if column not in sample:
        recorded = sorted(float(k.rsplit('_t', 1)[1]) for k in sample if k.startswith('teacher_rest_logprob_t'))
        raise ValueError(f'the precomputed teacher has no record for temperature {temperature:g} (recorded: '
                         f'{recorded}); rerun precompute-teacher with it in precompute.temperatures')
    cut = slice(0, max_seq_len)
    item = {
        TEACHER_IDS: torch.from_numpy(np.asarray(sample[_IDS_COLUMN][cut], dtype=np.int32)),
        TEACHER_REST: torch.from_numpy(np.array(sample[column][cut])),
    }
    if _FLOAT16_COLUMN in sample:
        item[TEACHER_LOGPROBS] = torch.from_numpy(np.array(sample[_FLOAT16_COLUMN][cut]))
    else:
        item[TEACHER_CODES] = torch.from_numpy(np.array(sample[_UINT8_COLUMN][cut]))
        if column != rest_column(1.0):  # the absolute values come from the rest mass at T = 1
            item[TEACHER_REST_T1] = torch.from_numpy(np.array(sample[rest_column(1.0)][cut]))
    return item


def pad_teacher(samples: Sequence[Mapping[str, torch.Tensor]], length: int) -> dict[str, torch.Tensor]:
    """The samples' teacher tensors right-padded to ``length`` positions and stacked.

    Padded positions get K distinct ids and the uniform distribution over the K + 1 buckets, so every
    divergence stays finite there (they are never scored).
    """
    k = samples[0][TEACHER_IDS].shape[1]
    fills = {TEACHER_LOGPROBS: -math.log(k + 1), TEACHER_CODES: 255, TEACHER_REST: -math.log(k + 1),
             TEACHER_REST_T1: -math.log(k + 1)}
    batch = {}
    for key in (TEACHER_IDS, *fills):
        if key not in samples[0]:
            continue
        if all(s[key].shape[0] == length for s in samples):
            batch[key] = torch.stack([s[key] for s in samples])
            continue
        first = samples[0][key]
        if key == TEACHER_IDS:
            padded = torch.arange(k, dtype=first.dtype).repeat(len(samples), length, 1)
        else:
            padded = torch.full((len(samples), length, *first.shape[1:]), fills[key], dtype=first.dtype)
        for row, sample in enumerate(samples):
            padded[row, :sample[key].shape[0]] = sample[key]
        batch[key] = padded
    return batch


def topk_teacher_from_batch(batch: Mapping[str, Any]) -> Optional[TopKTeacher]:
    """The batch's precomputed teacher, decoded to float32 on the batch's device; None when it carries none."""
    if batch.get(TEACHER_IDS) is None:
        return None
    rest = batch[TEACHER_REST].float()
    if TEACHER_LOGPROBS in batch:
        return TopKTeacher(batch[TEACHER_IDS], batch[TEACHER_LOGPROBS].float(), rest)
    codes = batch[TEACHER_CODES].float().clamp_(min=_CODE_ZERO)  # (B, T, K − 1); code 0 reads as 0.25
    log_ratios = torch.cat([codes.new_zeros(*codes.shape[:-1], 1), codes.div_(255.0).log_().mul_(3.0)], dim=-1)
    rest_t1 = batch[TEACHER_REST_T1].float() if TEACHER_REST_T1 in batch else rest
    top_mass = torch.log1p(-rest_t1.exp().clamp(max=1.0))  # log(1 − rest mass at T = 1)
    logprobs = log_ratios - log_ratios.logsumexp(dim=-1, keepdim=True) + top_mass[..., None]
    return TopKTeacher(batch[TEACHER_IDS], logprobs, rest)


_WEIGHT_SUFFIXES = ('.safetensors', '.bin', '.pt', '.pth', '.json')
_SAMPLED = 1 << 20  # bytes read from each end of each file


def teacher_fingerprint(source: str) -> Optional[str]:
    """SHA-256 of a local model folder's weights and config: every such file's name, size and first and last MiB
    (so a moved or copied folder keeps its fingerprint, another checkpoint does not). None for a hub id."""
    folder = os.path.expanduser(source)
    if not os.path.isdir(folder):
        return None
    digest = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if not name.endswith(_WEIGHT_SUFFIXES) or not os.path.isfile(path):
            continue
        size = os.path.getsize(path)
        digest.update(f'{name}:{size}:'.encode())
        with open(path, 'rb') as f:
            digest.update(f.read(_SAMPLED))
            f.seek(max(size - _SAMPLED, 0))
            digest.update(f.read(_SAMPLED))
    return digest.hexdigest()


def same_teacher(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Whether two records' ``teacher`` entries are the same model: by fingerprint when both have one (a
    local folder, wherever it lies now), else by source (a hub id)."""
    if a.get('fingerprint') and b.get('fingerprint'):
        return a['fingerprint'] == b['fingerprint']
    return a.get('source') == b.get('source')


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """SHA-256 of the tokenizer's vocabulary (every token and its id, added tokens included)."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: (item[1], item[0]))
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()


def read_metadata(local: Optional[str], remote: Optional[str], split: Optional[str],
                  timeout: float = 60) -> Optional[dict[str, Any]]:
    """The ``teacher_topk.json`` of a dataset split, from ``local`` or else ``remote``; None when there is none.
    A remote that cannot be reached (credentials, network) raises: that is no "no precomputed teacher"."""
    path = os.path.join(local or '', split or '', METADATA_FILE)
    if local and os.path.isfile(path):
        return read_json(path)
    if not remote:
        return None
    return remote_json(os.path.join(remote, split or '', METADATA_FILE), timeout)
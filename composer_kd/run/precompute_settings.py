"""The ``precompute:`` section of a ``precompute-teacher`` config → validated settings, before anything loads."""

import dataclasses
import os
import string
from typing import Any, Mapping, Optional

from streaming.base.compression import get_compressions

from composer_kd.data.teacher_topk import ENCODINGS
from composer_kd.errors import ConfigError
from composer_kd.run.checks import check_ensemble, check_fsdp, check_init_devices, check_precision, ensemble_mode
from composer_kd.run.value_checks import check_dataset_values, check_model_values, check_process_values

__all__ = ['PrecomputeSettings', 'check_precompute_config', 'check_precompute_paths']

_DATASET_PASSTHROUGH = ('local', 'remote', 'split', 'download_retry', 'download_timeout', 'validate_hash', 'keep_zip',
                        'predownload', 'cache_limit')


@dataclasses.dataclass(frozen=True)
class PrecomputeSettings:
    """Everything ``precompute-teacher`` needs besides the teacher and the tokenizer."""
    dataset: dict[str, Any]  # StreamingDataset arguments of the source split (local, remote, split, ...)
    max_seq_len: int
    out_local: str  # this process's folder: ``{rank}``, ``{local_rank}``, ``{node_rank}`` filled in, absolute
    out_remote: Optional[str]
    compression: Optional[str]
    top_k: int
    encoding: str
    device_batch_size: int
    temperatures: tuple[float, ...]  # sorted, 1.0 always among them
    samples_per_part: int
    progress_bar: bool
    precision: str

    @property
    def split_dir(self) -> str:
        """The local folder of the output split (``out.local/split``)."""
        return os.path.join(self.out_local, self.dataset.get('split') or '')

    @property
    def remote_split(self) -> Optional[str]:
        return os.path.join(self.out_remote, self.dataset.get('split') or '') if self.out_remote else None


def _positive_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f'{key} must be a positive integer, got {value!r}')
    return value


# The placeholders of ``precompute.out.local`` and the launcher's variables that fill them.
_FOLDER_FIELDS = {'rank': 'RANK', 'local_rank': 'LOCAL_RANK', 'node_rank': 'NODE_RANK'}


def _out_local(value: Any) -> str:
    """``precompute.out.local`` for this process: its placeholders filled from the launcher's environment."""
    if not isinstance(value, str) or not value:
        raise ConfigError(f'precompute.out.local must be a folder, got {value!r}')
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(value) if name is not None}
    except ValueError as e:
        raise ConfigError(f'precompute.out.local={value!r}: {e} (write a literal brace as {{{{ or }}}})') from e
    unknown = sorted(fields - set(_FOLDER_FIELDS))
    if unknown:
        raise ConfigError(f'precompute.out.local={value!r}: unknown placeholder {{{unknown[0]}}}; use '
                          f'{", ".join("{" + f + "}" for f in _FOLDER_FIELDS)}')
    return value.format(**{name: int(os.environ.get(var, '0')) for name, var in _FOLDER_FIELDS.items()})


def _temperatures(value: Any) -> tuple[float, ...]:
    values = value if isinstance(value, (list, tuple)) else [value]
    for t in values:
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0:
            raise ConfigError(f'precompute.temperatures must be numbers > 0, got {value!r}')
    return tuple(sorted({1.0, *(float(t) for t in values)}))


def check_precompute_config(cfg: Mapping[str, Any], world_size: int, gpu: bool,
                            fsdp_version: Optional[str] = None) -> PrecomputeSettings:
    """Checks every value of a ``precompute-teacher`` config that needs nothing loaded or read; returns the
    settings. (``check_precompute_paths`` then checks the folders.)

    ``precompute.out.local`` is the folder each process writes its parts to. Without ``precompute.out.remote``
    it must be one folder every process sees (one machine, or a shared filesystem). With a remote it may be a
    node's own disk, and it may name the process: ``{rank}``, ``{local_rank}`` and ``{node_rank}`` are filled
    in from the launcher's environment (``/scratch/topk-{node_rank}``); each process uploads the parts it writes
    and the remote holds the dataset.

    Raises:
        ConfigError: naming the key and the value.
    """
    precision = check_precision(cfg, gpu)
    check_process_values(cfg)
    check_model_values(cfg)
    check_fsdp(cfg, world_size, gpu, fsdp_version)
    check_init_devices(cfg, world_size, gpu)
    check_ensemble(cfg['model'])
    section = cfg['precompute']
    top_k = _positive_int('precompute.top_k', section['top_k'])
    encoding = section.get('logprobs', 'float16')
    if encoding not in ENCODINGS:
        raise ConfigError(f'precompute.logprobs={encoding!r}: use one of {list(ENCODINGS)}')
    if encoding == 'uint8' and top_k < 2:
        raise ConfigError(f'precompute.top_k={top_k}: the uint8 encoding stores entries relative to the top one, so '
                          'it needs top_k >= 2 (use logprobs: float16 for top_k 1)')
    batch = _positive_int('precompute.device_batch_size', section.get('device_batch_size', 8))
    per_part = _positive_int('precompute.samples_per_part', section.get('samples_per_part', 4096))
    if per_part % batch:
        raise ConfigError(f'precompute.samples_per_part={per_part} must be a multiple of '
                          f'precompute.device_batch_size={batch} (a part is whole batches)')
    if not isinstance(section.get('progress_bar', True), bool):
        raise ConfigError(f'precompute.progress_bar must be true or false, got {section["progress_bar"]!r}')

    dataset = section['dataset']
    max_seq_len = dataset['max_seq_len']
    if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 2:
        raise ConfigError(f'precompute.dataset.max_seq_len must be an integer >= 2, got {max_seq_len!r}')
    check_dataset_values('precompute.dataset', dataset)
    local, remote, split = dataset.get('local'), dataset.get('remote'), dataset.get('split')
    if not local and not remote:
        raise ConfigError('precompute.dataset: give local (a folder) and/or remote (a URI) of the MDS dataset')

    out = section['out']
    out_local = _out_local(out['local'])
    if local and os.path.abspath(os.path.join(out_local, split or '')) == os.path.abspath(
            os.path.join(local, split or '')):
        raise ConfigError(f'precompute.out.local={out["local"]!r} is the source dataset; write to another folder')
    compression = out.get('compression')
    if compression is not None and compression not in get_compressions():
        raise ConfigError(f'precompute.out.compression={compression!r}: use null or one of Streaming\'s '
                          f'compressions (e.g. zstd)')
    temperatures = _temperatures(section.get('temperatures', [1.0]))
    mode = ensemble_mode(cfg['model'])
    if cfg['model'].get('teachers') is not None and mode == 'probs' and temperatures != (1.0,):
        # The stored top-k is of the T = 1 mixture; a mixture of tempered distributions is not its power 1/T.
        raise ConfigError(f'precompute.temperatures={list(temperatures)}: an ensemble with ensemble: probs is stored '
                          'at temperature 1 only (its tempered mixture is not derived from it); distil offline at '
                          'temperature 1, or use ensemble: logits (one set of logits, every temperature exact)')
    return PrecomputeSettings(dataset={k: dataset[k] for k in _DATASET_PASSTHROUGH if dataset.get(k) is not None},
                              max_seq_len=max_seq_len,
                              out_local=os.path.abspath(out_local),
                              out_remote=out.get('remote'),
                              compression=compression,
                              top_k=top_k,
                              encoding=encoding,
                              device_batch_size=batch,
                              temperatures=temperatures,
                              samples_per_part=per_part,
                              progress_bar=section.get('progress_bar', True),
                              precision=precision)


def check_precompute_paths(settings: PrecomputeSettings) -> None:
    """Refuses a local-only source dataset that is not there."""
    local, split = settings.dataset.get('local'), settings.dataset.get('split')
    index = os.path.join(local or '', split or '', 'index.json')
    if not settings.dataset.get('remote') and not os.path.isfile(index):
        raise ConfigError(f'precompute.dataset: no MDS dataset at local={local!r} split={split!r} (missing {index})')

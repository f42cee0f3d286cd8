"""Type and range checks of the values a run config hands to Composer's ``Trainer``, the process and the data
loaders — each error naming its key and value, before any model or data is touched."""

import os
from typing import Any, Mapping

from composer.core import Time, TimeUnit

from composer_kd.errors import ConfigError
from composer_kd.run.config import model_entries
from composer_kd.run.model_section import check_model_section

__all__ = ['is_int', 'is_number', 'check_process_values', 'check_trainer_values', 'check_loader_values',
           'check_dataset_values', 'check_model_values', 'loader_max_seq_len']

_BOOLS = ('eval_first', 'save_overwrite', 'save_weights_only', 'load_weights_only', 'load_strict_model_weights',
          'autoresume', 'progress_bar', 'log_to_console', 'accumulate_train_batch_on_tokens')
_STRINGS = ('save_folder', 'save_filename', 'save_latest_filename', 'load_path')
_INTERVALS = ('eval_interval', 'save_interval', 'console_log_interval')
_LOG_LEVELS = ('debug', 'info', 'warning', 'error', 'critical')
# Streaming 0.13's registries (streaming.base.{partition,shuffle,batching,hashing}); spelled out so a check needs
# no import of Streaming internals.
_PARTITION_ALGOS = ('orig', 'relaxed')
_SHUFFLE_ALGOS = ('naive', 'py1br', 'py1e', 'py1s', 'py2s')
_SAMPLING_METHODS = ('balanced', 'fixed')
_BATCHING_METHODS = ('random', 'stratified', 'per_stream', 'device_per_stream')
_HASHES = ('blake2b', 'blake2s', 'md5', 'sha1', 'sha224', 'sha256', 'sha384', 'sha3_224', 'sha3_256', 'sha3_384',
           'sha3_512', 'sha512', 'xxh128', 'xxh32', 'xxh3_128', 'xxh3_64', 'xxh64')



def is_int(value: Any) -> bool:
    """An int that is not a bool (YAML's ``true`` is an int to Python)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """An int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _expect(ok: bool, key: str, value: Any, what: str) -> None:
    if not ok:
        raise ConfigError(f'{key} must be {what}, got {value!r}')


def _check_time(key: str, value: Any, units: tuple[TimeUnit, ...]) -> None:
    """A positive Composer time: an int (epochs) or a time string such as ``100ba`` in one of ``units``."""
    spelled = ', '.join(f'10{u.value}' for u in units)
    try:
        time = Time.from_input(value, TimeUnit.EPOCH) if not isinstance(value, bool) else None
    except (ValueError, TypeError):
        time = None
    if time is None or time.unit not in units or time.value <= 0:
        raise ConfigError(f'{key} must be a positive time such as {spelled} (or an int number of epochs), '
                          f'got {value!r}')


def check_process_values(cfg: Mapping[str, Any]) -> None:
    """Checks ``run_name``, ``seed``, ``dist_timeout`` and ``python_log_level`` (train and precompute configs)."""
    if cfg.get('run_name') is not None:
        _expect(isinstance(cfg['run_name'], str) and cfg['run_name'] != '', 'run_name', cfg['run_name'],
                'a non-empty string')
    if 'seed' in cfg:
        _expect(is_int(cfg['seed']) and 0 <= cfg['seed'] < 2**32, 'seed', cfg['seed'], 'an integer in [0, 2^32)')
    if 'dist_timeout' in cfg:
        _expect(is_number(cfg['dist_timeout']) and cfg['dist_timeout'] > 0, 'dist_timeout', cfg['dist_timeout'],
                'a number of seconds > 0')
    if 'python_log_level' in cfg:
        level = cfg['python_log_level']
        _expect(isinstance(level, str) and level.lower() in _LOG_LEVELS, 'python_log_level', level,
                f'one of {list(_LOG_LEVELS)}')


def check_trainer_values(cfg: Mapping[str, Any]) -> None:
    """Checks the top-level values that go to the ``Trainer`` (and ``seed``, ``dist_timeout``, logging), the
    model sections and the tokenizer."""
    check_process_values(cfg)
    check_model_values(cfg)
    for key in _BOOLS:
        if key in cfg:
            _expect(isinstance(cfg[key], bool), key, cfg[key], 'true or false')
    for key in _STRINGS:
        if cfg.get(key) is not None:
            _expect(isinstance(cfg[key], str) and cfg[key] != '', key, cfg[key], 'a non-empty string')
    if 'on_nonfinite' in cfg:
        _expect(cfg['on_nonfinite'] in ('raise', 'skip_batch'), 'on_nonfinite', cfg['on_nonfinite'],
                "one of ['raise', 'skip_batch']")
    if 'max_seq_len' in cfg:
        _expect(is_int(cfg['max_seq_len']) and cfg['max_seq_len'] > 0, 'max_seq_len', cfg['max_seq_len'],
                'a positive integer')
    _check_time('max_duration', cfg['max_duration'], (TimeUnit.EPOCH, TimeUnit.BATCH, TimeUnit.SAMPLE, TimeUnit.TOKEN))
    for key in _INTERVALS:
        if key == 'eval_interval' and cfg.get(key) == 0 and not isinstance(cfg[key], bool):
            continue  # Composer's spelling of "never evaluate during training"
        if cfg.get(key) is not None:
            _check_time(key, cfg[key], (TimeUnit.EPOCH, TimeUnit.BATCH, TimeUnit.SAMPLE, TimeUnit.TOKEN,
                                        TimeUnit.DURATION))
    for key in ('eval_subset_num_batches', 'train_subset_num_batches'):
        if key in cfg:
            _expect(is_int(cfg[key]) and (cfg[key] == -1 or cfg[key] > 0), key, cfg[key],
                    'a positive integer (or -1 for all)')
    if 'save_num_checkpoints_to_keep' in cfg:
        value = cfg['save_num_checkpoints_to_keep']
        _expect(is_int(value) and value >= -1, 'save_num_checkpoints_to_keep', value, 'an integer ≥ -1 (-1: keep all)')
    load_path = cfg.get('load_path')
    if load_path is not None and '://' not in load_path and '{' not in load_path:  # not a URI or a format string
        if not os.path.exists(load_path):
            raise ConfigError(f'load_path: no such checkpoint file or folder: {load_path}')


def loader_max_seq_len(cfg: Mapping[str, Any], loader: str) -> int:
    """``{loader}.dataset.max_seq_len``, defaulting to the top-level ``max_seq_len`` (LLM Foundry's ``TrainConfig``
    field); refuses the two disagreeing."""
    dataset = cfg[loader]['dataset']
    top = cfg.get('max_seq_len')
    value = dataset.get('max_seq_len', top)
    if value is None:
        raise ConfigError(f'missing required key {loader}.dataset.max_seq_len (or a top-level max_seq_len)')
    _expect(is_int(value) and value > 0, f'{loader}.dataset.max_seq_len', value, 'a positive integer')
    if top is not None and value != top:
        raise ConfigError(f'{loader}.dataset.max_seq_len={value} disagrees with the top-level max_seq_len={top}')
    return value


def check_dataset_values(section: str, dataset: Mapping[str, Any]) -> None:
    """Checks the ``StreamingDataset`` arguments of a ``*.dataset`` section (``max_seq_len`` separately)."""
    def choice(key: str, options: tuple[str, ...]) -> None:
        if key in dataset:
            _expect(dataset[key] in options, f'{section}.{key}', dataset[key], f'one of {list(options)}')

    def integer(key: str, low: int) -> None:
        if dataset.get(key) is not None:
            _expect(is_int(dataset[key]) and dataset[key] >= low, f'{section}.{key}', dataset[key],
                    f'an integer ≥ {low}')

    for key in ('local', 'remote', 'split'):
        if dataset.get(key) is not None:
            _expect(isinstance(dataset[key], str) and dataset[key] != '', f'{section}.{key}', dataset[key],
                    'a non-empty string')
    for key in ('shuffle', 'keep_zip'):
        if key in dataset:
            _expect(isinstance(dataset[key], bool), f'{section}.{key}', dataset[key], 'true or false')
    choice('shuffle_algo', _SHUFFLE_ALGOS)
    choice('partition_algo', _PARTITION_ALGOS)
    choice('sampling_method', _SAMPLING_METHODS)
    choice('batching_method', _BATCHING_METHODS)
    if dataset.get('validate_hash') is not None:
        choice('validate_hash', _HASHES)
    integer('shuffle_seed', 0)
    integer('download_retry', 0)
    integer('predownload', 0)
    for key in ('shuffle_block_size', 'num_canonical_nodes', 'sampling_granularity'):
        integer(key, 1)
    if 'download_timeout' in dataset:
        value = dataset['download_timeout']
        _expect(is_number(value) and value > 0, f'{section}.download_timeout', value, 'a number of seconds > 0')
    for key in ('epoch_size', 'cache_limit'):  # Streaming also takes strings such as '10k' / '10gb'
        value = dataset.get(key)
        if value is not None:
            _expect((is_int(value) and value > 0) or (isinstance(value, str) and value != ''), f'{section}.{key}',
                    value, 'a positive integer or a size string')


def check_loader_values(cfg: Mapping[str, Any], loader: str) -> None:
    """Checks a ``train_loader``/``eval_loader`` section: ``DataLoader`` arguments and its dataset."""
    section = cfg[loader]
    for key in ('drop_last', 'pin_memory', 'persistent_workers'):
        if key in section:
            _expect(isinstance(section[key], bool), f'{loader}.{key}', section[key], 'true or false')
    workers = section.get('num_workers', 0)
    _expect(is_int(workers) and workers >= 0, f'{loader}.num_workers', workers, 'an integer ≥ 0')
    if section.get('prefetch_factor') is not None:
        value = section['prefetch_factor']
        _expect(is_int(value) and value > 0, f'{loader}.prefetch_factor', value, 'a positive integer')
        if workers == 0:
            raise ConfigError(f'{loader}.prefetch_factor needs {loader}.num_workers > 0 (it is 0)')
    if section.get('persistent_workers') and workers == 0:
        raise ConfigError(f'{loader}.persistent_workers: true needs {loader}.num_workers > 0 (it is 0)')
    if 'timeout' in section:
        _expect(is_number(section['timeout']) and section['timeout'] >= 0, f'{loader}.timeout', section['timeout'],
                'a number of seconds ≥ 0')
    check_dataset_values(f'{loader}.dataset', section['dataset'])
    loader_max_seq_len(cfg, loader)


def check_model_values(cfg: Mapping[str, Any]) -> None:
    """Checks ``tokenizer`` and the student's and each teacher model's section (``run/model_section.py``)."""
    tokenizer = cfg['tokenizer']
    _expect(isinstance(tokenizer['name'], str) and tokenizer['name'] != '', 'tokenizer.name', tokenizer['name'],
            'a folder or a Hugging Face tokenizer id')
    _expect(isinstance(tokenizer.get('kwargs') or {}, Mapping), 'tokenizer.kwargs', tokenizer.get('kwargs'),
            'a mapping')
    for key, section in model_entries(cfg['model']):
        check_model_section(key, section)

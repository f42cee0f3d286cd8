"""A ``precompute-teacher`` config: its schema, its rules, and the settings the command runs with — all checked
before torch is imported. It shares ``variables``, ``model.teacher`` / ``model.teachers``, ``tokenizer``,
``precision`` and ``fsdp_config`` with run configs and adds ``precompute:``.
"""

import dataclasses
import os
import string
from typing import Any, Mapping, Optional

from composer_kd.config.kinds import AnyOf, Bool, Choice, Integer, ListOf, Number, Text
from composer_kd.config.loading import read_yaml
from composer_kd.config.model_schema import check_model_section, model_section
from composer_kd.config.paths import LocalPaths
from composer_kd.config.run_rules import check_fsdp, check_init_devices, check_precision, ensemble_weights, \
    model_entries
from composer_kd.config.run_schema import DATASET_KEYS, FSDP_CONFIG, LOG_LEVELS, PRECISIONS
from composer_kd.config.schema import MODEL, Free, Key, Section, SectionList, check
from composer_kd.errors import ConfigError
from composer_kd.losses.settings import ENSEMBLE_MODES

__all__ = [
    'COMPRESSIONS', 'ENCODINGS', 'PRECOMPUTE_SCHEMA', 'PrecomputeSettings', 'check_precompute_config',
    'check_precompute_paths', 'load_precompute_config'
]

ENCODINGS = ('float16', 'uint8')  # how the top-k log-probs are stored (data/teacher_topk.py)
# Streaming 0.13's compressions (streaming.base.compression.get_compressions(); tests/test_config_schema.py).
COMPRESSIONS = ('br', *(f'br:{i}' for i in range(12)), 'bz2', *(f'bz2:{i}' for i in range(1, 10)), 'gz',
                *(f'gz:{i}' for i in range(10)), 'snappy', 'zstd', *(f'zstd:{i}' for i in range(1, 23)))
_DATASET_PASSTHROUGH = ('local', 'remote', 'split', 'download_retry', 'download_timeout', 'validate_hash', 'keep_zip',
                        'predownload', 'cache_limit')
# The placeholders of ``precompute.out.local`` and the launcher's variables that fill them.
_FOLDER_FIELDS = {'rank': 'RANK', 'local_rank': 'LOCAL_RANK', 'node_rank': 'NODE_RANK'}

_TEMPERATURES = Number(0, low_open=True)
PRECOMPUTE_SCHEMA = Section('', 'A precompute-teacher config.', (
    Free('variables', 'Free values, used as `${variables.x}` anywhere in the file.'),
    Key('run_name', Text(), 'Names the job.'),
    Key('seed', Integer(0, 2**32, what='an integer in [0, 2^32)'), 'Seeds every process.', 17),
    Key('python_log_level', Choice(LOG_LEVELS, case_insensitive=True), 'Level of the composer and composer_kd '
        'loggers.', 'warning'),
    Key('dist_timeout', Number(0, low_open=True, what='a number of seconds > 0'), 'Seconds a collective waits.', 600),
    Key('precision', Choice(PRECISIONS), 'The teacher\'s precision (fp32 on CPU; default amp_bf16 on GPU).',
        refusal='{path}={value!r}: use {what}'),
    FSDP_CONFIG,
    Section('model', 'The teacher, or an ensemble of teachers.', (
        model_section('teacher', 'The teacher (Foundry\'s hf_causal_lm block).'),
        SectionList('teachers', 'teacher models (an ensemble)', model_section('N', 'An ensemble member.', Key(
            'weight', Number(0, low_open=True, what='a positive number'), 'Its weight (normalised to sum 1).', 1.0,
            MODEL))),
        Section('distillation', 'How an ensemble combines.', (
            Key('ensemble', Choice(ENSEMBLE_MODES), '`probs` (the T = 1 mixture; stored at temperature 1 only) or '
                '`logits` (every temperature exact).', 'probs', MODEL, refusal='{path}={value!r}: use {what}'),),
                dest=MODEL),
    ), required=True, dest=MODEL),
    Section('tokenizer', 'The run\'s tokenizer (its vocabulary is recorded with the data).', (
        Key('name', Text(what='a folder or a Hugging Face tokenizer id'), 'Folder or Hub id.', required=True),
        Free('kwargs', 'Passed to AutoTokenizer.from_pretrained.'),
    ), required=True),
    Section('precompute', 'What to run the teacher over and what to keep.', (
        Section('dataset', 'The token MDS split the teacher reads.', (
            *(k for k in DATASET_KEYS if k.name in _DATASET_PASSTHROUGH),
            Key('max_seq_len', Integer(2, what='an integer >= 2'), 'Tokens per sample (what students will read at '
                'most).', required=True),
        ), required=True),
        Section('out', 'Where the dataset is written.', (
            Key('local', Text(what='a folder'), 'The folder each process writes its parts to: one folder every '
                'process sees, or with `remote` a node\'s own disk (`{rank}`, `{local_rank}`, `{node_rank}` are '
                'filled in).', required=True),
            Key('remote', Text(), 'Where the parts and the finished dataset are uploaded (s3://, gs://, a folder).'),
            Key('compression', Choice(COMPRESSIONS), 'Streaming\'s shard compression (null: none).',
                refusal='{path}={value!r}: use null or one of Streaming\'s compressions (e.g. zstd)'),
        ), required=True),
        Key('top_k', Integer(1), 'Entries kept per position.', required=True),
        Key('logprobs', Choice(ENCODINGS), 'How they are stored: `float16`, or `uint8` (cube-root ratios to the top '
            'entry; ~1 byte each).', 'float16', refusal='{path}={value!r}: use {what}'),
        Key('device_batch_size', Integer(1), 'Samples per teacher forward on one device.', 8),
        Key('temperatures', AnyOf(_TEMPERATURES, ListOf(_TEMPERATURES), what='numbers > 0'), 'Temperatures whose '
            'rest mass is recorded (1 always is); students distil at one of them.', [1.0]),
        Key('samples_per_part', Integer(1), 'Samples per part (the unit of resumption; whole batches).', 4096),
        Key('progress_bar', Bool(), 'A progress bar on rank 0.', True),
    ), required=True),
))


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


def load_precompute_config(path: str, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """Reads a ``precompute-teacher`` YAML (a file or a shipped recipe), applies overrides and checks it against
    ``PRECOMPUTE_SCHEMA``.

    Raises:
        ConfigError: naming the key and the value.
    """
    cfg = read_yaml(path, overrides)
    check(cfg, PRECOMPUTE_SCHEMA)
    return cfg


def _out_local(value: str) -> str:
    """``precompute.out.local`` for this process: its placeholders filled from the launcher's environment."""
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(value) if name is not None}
    except ValueError as e:
        raise ConfigError(f'precompute.out.local={value!r}: {e} (write a literal brace as {{{{ or }}}})') from e
    unknown = sorted(fields - set(_FOLDER_FIELDS))
    if unknown:
        raise ConfigError(f'precompute.out.local={value!r}: unknown placeholder {{{unknown[0]}}}; use '
                          f'{", ".join("{" + f + "}" for f in _FOLDER_FIELDS)}')
    return value.format(**{name: int(os.environ.get(var, '0')) for name, var in _FOLDER_FIELDS.items()})


def check_precompute_config(cfg: Mapping[str, Any], world_size: int, gpu: bool, fsdp_version: Optional[str] = None,
                            paths: Optional[LocalPaths] = None) -> PrecomputeSettings:
    """The rules of a ``precompute-teacher`` config (whose keys ``PRECOMPUTE_SCHEMA`` checked); returns the
    settings. (``check_precompute_paths`` then checks the source dataset.)

    ``precompute.out.local`` is the folder each process writes its parts to. Without ``precompute.out.remote``
    it must be one folder every process sees (one machine, or a shared filesystem). With a remote it may be a
    node's own disk, and it may name the process: ``{rank}``, ``{local_rank}`` and ``{node_rank}`` are filled
    in from the launcher's environment (``/scratch/topk-{node_rank}``); each process uploads the parts it writes
    and the remote holds the dataset.

    Raises:
        ConfigError: naming the key and the value.
    """
    paths = paths or LocalPaths()
    precision = check_precision(cfg, gpu)
    model = cfg['model']
    if model.get('teacher') is not None and model.get('teachers') is not None:
        raise ConfigError('model: give model.teacher (one teacher) or model.teachers (an ensemble), not both')
    if model.get('teacher') is None and model.get('teachers') is None:
        raise ConfigError('missing required key model.teacher (or model.teachers for an ensemble)')
    for key, section in model_entries(model):
        check_model_section(key, section)
        if section.get('pretrained_model_name_or_path') is not None:
            paths.folder(f'{key}.pretrained_model_name_or_path', section['pretrained_model_name_or_path'])
    paths.folder('tokenizer.name', cfg['tokenizer']['name'])
    check_fsdp(cfg, world_size, gpu, fsdp_version)
    check_init_devices(cfg, world_size, gpu)
    ensemble_weights(model)
    section = cfg['precompute']
    top_k, encoding = section['top_k'], section.get('logprobs', 'float16')
    if encoding == 'uint8' and top_k < 2:
        raise ConfigError(f'precompute.top_k={top_k}: the uint8 encoding stores entries relative to the top one, so '
                          'it needs top_k >= 2 (use logprobs: float16 for top_k 1)')
    batch = section.get('device_batch_size', 8)
    per_part = section.get('samples_per_part', 4096)
    if per_part % batch:
        raise ConfigError(f'precompute.samples_per_part={per_part} must be a multiple of '
                          f'precompute.device_batch_size={batch} (a part is whole batches)')
    dataset = section['dataset']
    local, remote, split = dataset.get('local'), dataset.get('remote'), dataset.get('split')
    if not local and not remote:
        raise ConfigError('precompute.dataset: give local (a folder) and/or remote (a URI) of the MDS dataset')
    out = section['out']
    out_local = _out_local(out['local'])
    if local and os.path.abspath(os.path.join(out_local, split or '')) == os.path.abspath(
            os.path.join(local, split or '')):
        raise ConfigError(f'precompute.out.local={out["local"]!r} is the source dataset; write to another folder')
    temperatures = section.get('temperatures', [1.0])
    temperatures = tuple(sorted({1.0, *(float(t) for t in (temperatures if isinstance(temperatures, list) else
                                                              [temperatures]))}))
    mode = (model.get('distillation') or {}).get('ensemble', 'probs')
    if model.get('teachers') is not None and mode == 'probs' and temperatures != (1.0,):
        # The stored top-k is of the T = 1 mixture; a mixture of tempered distributions is not its power 1/T.
        raise ConfigError(f'precompute.temperatures={list(temperatures)}: an ensemble with ensemble: probs is stored '
                          'at temperature 1 only (its tempered mixture is not derived from it); distil offline at '
                          'temperature 1, or use ensemble: logits (one set of logits, every temperature exact)')
    return PrecomputeSettings(dataset={k: dataset[k] for k in _DATASET_PASSTHROUGH if dataset.get(k) is not None},
                              max_seq_len=dataset['max_seq_len'],
                              out_local=os.path.abspath(out_local),
                              out_remote=out.get('remote'),
                              compression=out.get('compression'),
                              top_k=top_k,
                              encoding=encoding,
                              device_batch_size=batch,
                              temperatures=temperatures,
                              samples_per_part=per_part,
                              progress_bar=section.get('progress_bar', True),
                              precision=precision)


def check_precompute_paths(settings: PrecomputeSettings, paths: Optional[LocalPaths] = None) -> None:
    """Refuses a local-only source dataset that is not there."""
    local, split = settings.dataset.get('local'), settings.dataset.get('split')
    index = os.path.join(local or '', split or '', 'index.json')
    if not settings.dataset.get('remote'):
        (paths or LocalPaths()).file('precompute.dataset.local', index, f'precompute.dataset: no MDS dataset at '
                                     f'local={local!r} split={split!r} (missing {index})')

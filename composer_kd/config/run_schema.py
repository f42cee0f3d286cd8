"""The schema of a run config (``composer-kd train``, each round of ``composer-kd rounds``): every key.

The layout is LLM Foundry's ``TrainConfig`` wherever it has one; distillation settings live under ``model:``.
A key whose ``dest`` is ``TRAINER`` is handed to Composer's ``Trainer`` under its own name, as written: adding
such a key here is all it takes to validate it, pass it on and document it.
"""

from composer_kd.config.kinds import AnyOf, Anything, Bool, Choice, Integer, Number, Size, Text, Time
from composer_kd.config.model_schema import DISTILLATION, FROM_TEACHER, model_section
from composer_kd.config.schema import DATASET, FSDP, LOADER, MODEL, RUN, TRAINER, Free, Key, Registry, Section, \
    SectionList

__all__ = ['DATASET_KEYS', 'FOUNDRY_MODEL_BLOCK', 'FSDP_CONFIG', 'PRECISIONS', 'RUN_SCHEMA', 'trainer_keys']

PRECISIONS = ('fp32', 'amp_bf16', 'amp_fp16', 'amp_fp8')
LOG_LEVELS = ('debug', 'info', 'warning', 'error', 'critical')
_RUN_UNITS = ('ep', 'ba', 'sp', 'tok')
_INTERVAL_UNITS = ('ep', 'ba', 'sp', 'tok', 'dur')
# Streaming 0.13's registries (streaming.base.{partition,shuffle,batching,hashing}); tests/test_config_schema.py
# checks them against Streaming.
SHUFFLE_ALGOS = ('naive', 'py1br', 'py1e', 'py1s', 'py2s')
PARTITION_ALGOS = ('orig', 'relaxed')
SAMPLING_METHODS = ('balanced', 'fixed')
BATCHING_METHODS = ('random', 'stratified', 'per_stream', 'device_per_stream')
HASHES = ('blake2b', 'blake2s', 'md5', 'sha1', 'sha224', 'sha256', 'sha384', 'sha3_224', 'sha3_256', 'sha3_384',
          'sha3_512', 'sha512', 'xxh128', 'xxh32', 'xxh3_128', 'xxh3_64', 'xxh64')
# Composer 0.32.1's FSDPConfig fields and FSDP2Config.settable_attrs() (tests/test_config_schema.py checks them).
FSDP_KEYS = ('activation_checkpointing', 'activation_checkpointing_reentrant', 'activation_cpu_offload', 'auto_wrap',
             'backward_prefetch', 'backward_prefetch_limit', 'cpu_offload', 'data_parallel_replicate_degree',
             'data_parallel_shard_degree', 'device_mesh', 'forward_prefetch', 'forward_prefetch_limit',
             'ignored_modules', 'keep_low_precision_grads', 'limit_all_gathers', 'load_monolith_rank0_only',
             'load_planner', 'mixed_precision', 'process_group', 'reshard_after_forward', 'save_planner',
             'sharded_ckpt_prefix_dir', 'sharding_strategy', 'state_dict_type', 'sync_module_states',
             'te_checkpoint_wrapper', 'te_shard_fp8_weight', 'use_orig_params', 'verbose')

_SECONDS = Number(0, low_open=True, what='a number of seconds > 0')
_NONEMPTY = Text()

DATASET_KEYS = (
    Key('local', _NONEMPTY, 'Local folder of the MDS dataset (or its cache, with `remote`).', dest=DATASET),
    Key('remote', _NONEMPTY, 'Where the shards are downloaded from (s3://, gs://, oci://, a folder, ...).',
        dest=DATASET),
    Key('split', _NONEMPTY, 'Sub-folder of the split (`train`, `val`).', dest=DATASET),
    Key('max_seq_len', Integer(1), 'Tokens per sample (defaults to the top-level `max_seq_len`).', dest=RUN),
    Key('shuffle', Bool(), 'Shuffle the samples.', False, DATASET),
    Key('shuffle_seed', Integer(0), 'Seed of the shuffle.', dest=DATASET),
    Key('shuffle_algo', Choice(SHUFFLE_ALGOS), 'Streaming\'s shuffle algorithm.', dest=DATASET),
    Key('shuffle_block_size', Integer(1), 'Streaming\'s shuffle block size.', dest=DATASET),
    Key('predownload', Integer(0), 'Samples to download ahead.', dest=DATASET),
    Key('download_retry', Integer(0), 'Download retries per shard.', dest=DATASET),
    Key('download_timeout', _SECONDS, 'Seconds before a shard download fails.', dest=DATASET),
    Key('validate_hash', Choice(HASHES), 'Check each shard\'s hash (named in index.json).', dest=DATASET),
    Key('keep_zip', Bool(), 'Keep compressed shards after decompressing them.', dest=DATASET),
    Key('epoch_size', Size(), 'Samples per epoch (more or fewer than the dataset\'s).', dest=DATASET),
    Key('cache_limit', Size(), 'Local cache limit (evicts shards beyond it).', dest=DATASET),
    Key('partition_algo', Choice(PARTITION_ALGOS), 'Streaming\'s partitioning over nodes and workers.', dest=DATASET),
    Key('num_canonical_nodes', Integer(1), 'Streaming\'s canonical nodes (sample order across node counts).',
        dest=DATASET),
    Key('sampling_method', Choice(SAMPLING_METHODS), 'Streaming\'s sampling method.', dest=DATASET),
    Key('sampling_granularity', Integer(1), 'Streaming\'s sampling granularity.', dest=DATASET),
    Key('batching_method', Choice(BATCHING_METHODS), 'Streaming\'s batching method.', dest=DATASET),
)


def _loader(name: str, required: bool) -> Section:
    return Section(name, f'The {"training" if name == "train_loader" else "evaluation"} data: MDS shards with a '
                   '`tokens` column (`composer-kd prepare-data`, or LLM Foundry\'s converters with --concat_tokens).',
                   (
                       Key('name', Choice(['text', 'tokens', 'prompts'], what="'text' (MDS token data), 'prompts' "
                                          "(on-policy distillation) or left out"),
                           '`text`: MDS token data (Foundry\'s name); `prompts`: a prompt dataset for on-policy '
                           'distillation.', 'text', LOADER),
                       Section('dataset', 'The StreamingDataset.', DATASET_KEYS, required=True, dest=DATASET),
                       Key('drop_last', Bool(), 'Drop the last incomplete batch.', True, LOADER),
                       Key('num_workers', Integer(0), 'DataLoader worker processes.', 0, LOADER),
                       Key('pin_memory', Bool(), 'Pin batches in page-locked memory (GPU).', False, LOADER),
                       Key('prefetch_factor', Integer(1), 'Batches each worker loads ahead (needs workers).',
                           dest=LOADER),
                       Key('persistent_workers', Bool(), 'Keep workers between epochs (needs workers).', False,
                           LOADER),
                       Key('timeout', Number(0, what='a number of seconds ≥ 0'), 'Seconds to wait for a batch.', 0,
                           LOADER),
                   ), required=required, dest=LOADER)


FSDP_CONFIG = Section('fsdp_config', 'Composer\'s FSDP settings (`parallelism_config[\'fsdp\']`); ignored with a '
                      'warning on one process. FSDP2 with FSDP_VERSION=2 in the environment (runs on CPU too).',
                      tuple(Key(name, Anything(), 'See Composer\'s FSDPConfig / FSDP2Config.', dest=FSDP)
                            for name in FSDP_KEYS),
                      dest=FSDP)

_TEACHER_HELP = ('The frozen teacher; leave out for label-only training (alpha 1). `{precomputed: true}`: the '
                 'teacher\'s top-k comes with train_loader\'s data (`composer-kd precompute-teacher`).')

RUN_SCHEMA = Section('', 'A run config.', (
    Free('variables', 'Free values, used as `${variables.x}` anywhere in the file; nothing else is free-form.'),
    Key('run_name', _NONEMPTY, 'Names the run (its checkpoints, `{run_name}` in paths); needed by autoresume.',
        dest=TRAINER),
    Key('seed', Integer(0, 2**32, what='an integer in [0, 2^32)'), 'Seeds every process (fresh weights, data order) '
        'and the Trainer.', 17),
    Key('max_seq_len', Integer(1), 'Tokens per sample: the loaders\' default.'),
    Section('model', 'The student, the teacher(s) and the loss.', (
        model_section('student', 'The model that learns (Foundry\'s hf_causal_lm block).', FROM_TEACHER,
                      required=True),
        model_section('teacher', _TEACHER_HELP, Key('precomputed', Choice([True], what='true (leave it out for a '
                                                                         'teacher model)'),
                                                    'The teacher is precomputed data, not a model.', dest=MODEL)),
        SectionList('teachers', 'teacher models (an ensemble)', model_section('N', 'An ensemble member.', Key(
            'weight', Number(0, low_open=True, what='a positive number'), 'Its weight (normalised to sum 1).', 1.0,
            MODEL))),
        DISTILLATION,
    ), required=True, dest=MODEL),
    Section('tokenizer', 'The tokenizer student and teacher share.', (
        Key('name', Text(what='a folder or a Hugging Face tokenizer id'), 'Folder or Hub id.', required=True),
        Free('kwargs', 'Passed to AutoTokenizer.from_pretrained (e.g. model_max_length).'),
    ), required=True),
    _loader('train_loader', required=True),
    _loader('eval_loader', required=False),
    Registry('optimizer', 'The optimizer of the student\'s parameters: `{name: NAME, **arguments}`.', 'optimizers',
             many=False, required=True),
    Registry('scheduler', 'The learning-rate schedule: `{name: NAME, **arguments}`.', 'schedulers', many=False),
    Registry('algorithms', 'Composer algorithms: `{NAME: arguments}`.', 'algorithms', many=True),
    Registry('callbacks', 'Callbacks, Composer\'s and composer-kd\'s: `{NAME: arguments}`.', 'callbacks', many=True),
    Registry('loggers', 'Loggers: `{NAME: arguments}`.', 'loggers', many=True),
    Key('max_duration', Time(_RUN_UNITS), 'How long to train.', dest=TRAINER, required=True),
    Key('eval_interval', Time(_INTERVAL_UNITS, zero_means='never'), 'How often to evaluate (0: never during '
        'training).', dest=TRAINER),
    Key('eval_first', Bool(), 'Evaluate before the first step.', False),
    Key('eval_subset_num_batches', Integer(1, also=(-1,), what='a positive integer (or -1 for all)'),
        'Eval batches per evaluation.', dest=TRAINER),
    Key('train_subset_num_batches', Integer(1, also=(-1,), what='a positive integer (or -1 for all)'),
        'Batches per epoch.', dest=TRAINER),
    Key('global_train_batch_size', Integer(1), 'Samples per step over all processes (must divide by them).',
        required=True),
    Key('device_train_microbatch_size', AnyOf(Integer(1), Choice(['auto']), what="a positive integer or 'auto'"),
        'Samples per forward on one device (must divide the device batch; `auto` on GPU).'),
    Key('device_eval_batch_size', Integer(1), 'Eval samples per device batch.'),
    Key('accumulate_train_batch_on_tokens', Bool(), 'Weight microbatches by scored tokens: exact steps with padding '
        'and any split (Foundry\'s default).', True),
    Key('precision', Choice(PRECISIONS), 'Composer\'s precision (fp32 on CPU; default amp_bf16 on GPU).',
        refusal='{path}={value!r}: use {what}'),
    FSDP_CONFIG,
    Key('save_folder', _NONEMPTY, 'Where checkpoints go (a folder or s3://...; `{run_name}` is filled in).',
        dest=TRAINER),
    Key('save_interval', Time(_INTERVAL_UNITS), 'How often to checkpoint.', dest=TRAINER),
    Key('save_num_checkpoints_to_keep', Integer(-1, what='an integer ≥ -1 (-1: keep all)'), 'Checkpoints kept.',
        dest=TRAINER),
    Key('save_overwrite', Bool(), 'Overwrite existing checkpoints.', dest=TRAINER),
    Key('save_filename', _NONEMPTY, 'Checkpoint file name format.', dest=TRAINER),
    Key('save_latest_filename', _NONEMPTY, 'Name of the link to the latest checkpoint.', dest=TRAINER),
    Key('save_weights_only', Bool(), 'Checkpoint the weights alone.', dest=TRAINER),
    Key('load_path', _NONEMPTY, 'A checkpoint to start from.', dest=TRAINER),
    Key('load_weights_only', Bool(), 'Load only the weights from `load_path`.', dest=TRAINER),
    Key('load_strict_model_weights', Bool(), 'Refuse missing or unexpected weights in `load_path`.', dest=TRAINER),
    Key('autoresume', Bool(), 'Resume from the latest checkpoint of `run_name` in `save_folder`.', dest=TRAINER),
    Key('progress_bar', Bool(), 'Composer\'s progress bar.', dest=TRAINER),
    Key('log_to_console', Bool(), 'Log metrics to the console.', dest=TRAINER),
    Key('console_log_interval', Time(_INTERVAL_UNITS), 'How often to log to the console.', dest=TRAINER),
    Key('python_log_level', Choice(LOG_LEVELS, case_insensitive=True), 'Level of the composer and composer_kd '
        'loggers.', 'warning'),
    Key('dist_timeout', _SECONDS, 'Seconds a collective waits for the other processes.', 600, TRAINER),
    Key('on_nonfinite', Choice(['raise', 'skip_batch']), 'A NaN/Inf loss stops the run naming step, rank and '
        'samples (`raise`), or its batch is skipped (`skip_batch`).', 'raise'),
))


def _model_section() -> Section:
    return next(e for e in RUN_SCHEMA.entries if e.name == 'model')


# LLM Foundry's model block for composer_kd_distillation (composer_kd/foundry/model.py): our model section, plus
# Foundry's top-level init_device (applied to the sections without their own).
FOUNDRY_MODEL_BLOCK = Section('model', 'LLM Foundry\'s `model:` block of `name: composer_kd_distillation`.', (
    *_model_section().entries,
    Key('init_device', Choice(['cpu', 'meta', 'mixed']), 'Foundry\'s: the student\'s and teachers\' init_device '
        'where they set none.', dest=MODEL),
), dest=MODEL)


def trainer_keys() -> tuple[str, ...]:
    """The top-level keys handed to Composer's ``Trainer`` as written."""
    return tuple(e.name for e in RUN_SCHEMA.entries if isinstance(e, Key) and e.dest == TRAINER)

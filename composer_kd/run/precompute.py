"""``composer-kd precompute-teacher``: run the teacher once over a token MDS split and write its top-k.

The output is one MDS dataset (``data/teacher_topk.py`` says what a sample holds; ``data/topk_parts.py``
how the split is laid out) that ``train`` reads as it is with ``model.teacher: {precomputed: true}``.

Samples are cut into parts of ``samples_per_part`` by their index; parts are dealt to the processes round by
round and each is written all at once, so

* N processes give the same dataset as one, sample for sample (the same batches meet the same kernels);
* a killed run (SIGKILL included) is finished by the same command: complete parts are kept, the others are
  recomputed, nothing is missing or duplicated;
* a rerun on a complete output says so and writes nothing;
* with ``out.remote``, each process's ``out.local`` may be its node's own disk: each process uploads the parts
  it writes, rank 0 decides from its folder, the other ranks' folders and the remote which parts are complete
  (the same plan for every rank), and merges the parts from the remote.

The teacher runs through Composer's ``Trainer.predict`` (device placement, ``precision``, FSDP when
``fsdp_config`` is set), so every process runs the same number of batches in every round; a process with
less to do runs copies of a real batch whose outputs are dropped.
"""

import contextlib
import logging
import math
import os
import time
import warnings
from typing import Any, Iterator, Mapping, Optional, Sequence

import numpy as np
import torch
from composer import Callback, Trainer
from composer.core import State
from composer.loggers import Logger
from composer.utils import dist, get_device, reproducibility
from tqdm import tqdm

from composer_kd.data.streaming_resources import release_shared_memory
from composer_kd.data.teacher_topk import (
    encode_sample,
    mds_columns,
)
from composer_kd.data.tokens import TokenDataset, collate_tokens
from composer_kd.data.topk_parts import (
    PLAN_FILE,
    PartWriter,
    merge_parts,
    publish_metadata,
    remove_partial_parts,
    upload_files,
    upload_part,
    write_json,
    write_part,
)
from composer_kd.errors import ConfigError
from composer_kd.model.frozen_teachers import FrozenTeachers
from composer_kd.model.teacher_topk_model import TeacherTopKModel
from composer_kd.model.vocab import embedding_rows
from composer_kd.run import precompute_record as record
from composer_kd.run.cpu_threads import share_cpu_cores
from composer_kd.builders.models import build_causal_lm, build_tokenizer, check_model_tokenizer
from composer_kd.config.model_schema import fsdp_settings
from composer_kd.config.precompute_config import PRECOMPUTE_SCHEMA, PrecomputeSettings, check_precompute_config, \
    check_precompute_paths
from composer_kd.config.run_rules import ensemble_mode, ensemble_weights, teacher_entries
from composer_kd.config.schema import check

__all__ = ['precompute_teacher']

log = logging.getLogger(__name__)

class _Batches(torch.utils.data.IterableDataset):
    """This rank's whole batches of source samples, in order: ``input_ids``, ``attention_mask``, ``sample_index``
    and ``dummy``. (Iterable: the ranks' shares are planned here, not by a distributed sampler.)"""

    def __init__(self, dataset: TokenDataset, batches: Sequence[tuple[Sequence[int], bool]], pad_id: int) -> None:
        self.dataset, self.batches, self.pad_id = dataset, batches, pad_id

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for indices, dummy in self.batches:
            batch = collate_tokens([self.dataset[j] for j in indices], self.pad_id)
            batch['sample_index'] = torch.tensor(indices, dtype=torch.long)
            batch['dummy'] = torch.full((len(indices),), dummy)
            yield batch


class _TopKWriter(Callback):
    """Writes each predicted batch's real samples to the current part, and counts progress on every rank."""

    def __init__(self, settings: PrecomputeSettings, vocab_size: int, progress: Optional[tqdm]) -> None:
        self.settings, self.vocab_size, self.progress = settings, vocab_size, progress
        self.writer: Optional[PartWriter] = None
        self.tokens = 0

    def predict_batch_end(self, state: State, logger: Logger) -> None:
        batch, out = state.batch, state.outputs
        real = (~batch['dummy']).cpu().numpy()
        lengths = batch['attention_mask'].sum(dim=1).cpu().numpy()
        if self.writer is not None and real.any():
            tokens, index = batch['input_ids'].cpu().numpy(), batch['sample_index'].cpu().numpy()
            ids, logprobs, rest = (out[k].cpu().numpy() for k in ('ids', 'logprobs', 'rest'))
            for row in np.flatnonzero(real):
                n = int(lengths[row])
                rests = {t: rest[row, :n, m] for m, t in enumerate(self.settings.temperatures)}
                self.writer.write(
                    encode_sample(tokens[row, :n], int(index[row]), ids[row, :n], logprobs[row, :n], rests,
                                  self.vocab_size, self.settings.encoding))
        counts = state.device.tensor_to_device(torch.tensor([int(real.sum()), int(lengths[real].sum())]))
        dist.all_reduce(counts)
        if self.progress is not None:
            self.tokens += int(counts[1])
            self.progress.update(int(counts[0]))
            rate = self.tokens / max(self.progress.format_dict['elapsed'], 1e-9)
            self.progress.set_postfix_str(f'{rate:,.0f} tok/s', refresh=False)


def _rounds(remaining: Sequence[int], world_size: int, total: int, settings: PrecomputeSettings,
            rank: int) -> list[tuple[Optional[int], list[tuple[list[int], bool]]]]:
    """Per round, this rank's part (or None) and its batches, padded with dummies to the round's longest."""
    per_part, batch = settings.samples_per_part, settings.device_batch_size
    dummy = (list(range(min(batch, total))), True)
    rounds = []
    for start in range(0, len(remaining), world_size):
        parts = remaining[start:start + world_size]
        spans = [range(p * per_part, min((p + 1) * per_part, total)) for p in parts]
        longest = max(math.ceil(len(s) / batch) for s in spans)
        mine = parts[rank] if rank < len(parts) else None
        batches = []
        if mine is not None:
            span = spans[rank]
            batches = [(list(span[i:i + batch]), False) for i in range(0, len(span), batch)]
        rounds.append((mine, batches + [dummy] * (longest - len(batches))))
    return rounds


def precompute_teacher(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Runs (or finishes) a precompute; returns ``{'samples', 'tokens', 'bytes', 'bytes_per_token', 'wall_s',
    'loop_s', 'parts_written', 'parts_kept', 'complete_before'}`` (``loop_s``: the teacher passes and writes,
    without start-up and the final merge).

    Raises:
        ConfigError: for any value that cannot be used, naming its key, before the teacher loads.
    """
    start_time = time.perf_counter()
    gpu = torch.cuda.is_available()
    world_size = int(os.environ.get('WORLD_SIZE', '1'))
    check(cfg, PRECOMPUTE_SCHEMA)  # a library caller's dict too
    settings = check_precompute_config(cfg, world_size, gpu, os.environ.get('FSDP_VERSION'))
    logging.basicConfig(format='%(asctime)s %(levelname)s %(name)s: %(message)s')
    level = str(cfg.get('python_log_level', 'warning')).upper()
    for name in ('composer', 'composer_kd'):
        logging.getLogger(name).setLevel(level)
    check_precompute_paths(settings)
    teachers = teacher_entries(cfg['model'])
    if not gpu:
        share_cpu_cores()
    dist.initialize_dist(get_device('gpu' if gpu else 'cpu'), timeout=float(cfg.get('dist_timeout', 600)))
    rank = dist.get_global_rank()
    reproducibility.seed_all(cfg.get('seed', 17))

    tokenizer = build_tokenizer(cfg['tokenizer'])
    vocab = len(tokenizer)
    if settings.top_k > vocab:
        raise ConfigError(f'precompute.top_k={settings.top_k} is more than the {vocab} tokens of the vocabulary')
    for key, section in teachers:
        check_model_tokenizer(key, section, tokenizer)
    try:
        source = TokenDataset(max_seq_len=settings.max_seq_len, shuffle=False, batch_size=settings.device_batch_size,
                              vocab_size=vocab, **settings.dataset)
        total = source.num_samples
        if total == 0:
            raise ValueError('it has no samples')
        source[0]  # a dataset without a tokens column fails here, with its columns named
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f'precompute.dataset: {str(e).splitlines()[0]}') from e
    plan = record.plan(cfg, settings, tokenizer, total)
    num_parts = math.ceil(total / settings.samples_per_part)
    # Rank 0 decides from every rank's folder (each may be a node's own disk) and the remote, for every rank:
    # ranks that planned from their own folders could plan different rounds and hang in a collective.
    states = dist.all_gather_object(record.local_state(settings, plan))  # also: every rank has read its folder
    decision = [record.decide(settings, plan, states, num_parts) if rank == 0 else None]
    dist.broadcast_object_list(decision, src=0)
    decided: dict[str, Any] = decision[0]
    if decided.get('error'):
        release_shared_memory(source)
        raise ConfigError(decided['error'])
    metadata = decided['metadata']
    if metadata is not None:
        release_shared_memory(source)
        if rank == 0:
            print(f'precompute-teacher: {settings.remote_split or settings.split_dir} is complete '
                  f'({metadata["samples"]} samples, {metadata["tokens"]} tokens, k={metadata["top_k"]}); nothing to do')
        return {**record.summary(metadata), 'wall_s': time.perf_counter() - start_time, 'loop_s': 0.0,
                'parts_written': 0, 'parts_kept': metadata['parts']['count'], 'complete_before': True}
    # Each rank readies its own folder (ranks sharing one write the same plan, all at once).
    os.makedirs(settings.split_dir, exist_ok=True)
    for name in remove_partial_parts(settings.split_dir):
        print(f'precompute-teacher: removed the interrupted part {name}')
    write_json(os.path.join(settings.split_dir, PLAN_FILE), plan)
    if rank == 0 and decided['upload_plan']:
        upload_files(settings.split_dir, settings.remote_split, [PLAN_FILE])  # before any part
    dist.barrier()
    for part in decided['uploads'].get(rank, []):  # complete parts that only this rank's folder holds
        upload_part(settings.split_dir, settings.remote_split, part)
    kept: dict[int, dict[str, Any]] = decided['kept']

    models = [build_causal_lm(key, section) for key, section in teachers]
    for (key, _), model in zip(teachers, models):
        if embedding_rows(model) < vocab:
            raise ConfigError(f'{key}: it has {embedding_rows(model)} output logits but the tokenizer has {vocab} '
                              'tokens')
    ensemble = FrozenTeachers(models, ensemble_weights(cfg['model']) if len(models) > 1 else None,
                              ensemble_mode(cfg['model']))
    remaining = [p for p in range(num_parts) if p not in kept]
    todo = sum(min((p + 1) * settings.samples_per_part, total) - p * settings.samples_per_part for p in remaining)
    progress = tqdm(total=todo, desc='precompute-teacher', unit='sample', mininterval=1.0,
                    disable=not settings.progress_bar) if rank == 0 else None
    writer_callback = _TopKWriter(settings, vocab, progress)
    fsdp = cfg.get('fsdp_config')
    with warnings.catch_warnings():  # 'No optimizer was specified': there is nothing to optimize here
        warnings.simplefilter('ignore', UserWarning)
        trainer = Trainer(model=TeacherTopKModel(ensemble, vocab, settings.top_k, settings.temperatures),
                          device='gpu' if gpu else 'cpu',
                          precision=settings.precision,
                          parallelism_config={'fsdp': fsdp_settings(fsdp, [s for _, s in teachers])}
                          if fsdp is not None and world_size > 1 else None,
                          callbacks=[writer_callback],
                          loggers=[],
                          progress_bar=False,
                          log_to_console=False,
                          seed=cfg.get('seed', 17))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    columns = mds_columns(vocab, settings.encoding, settings.temperatures)
    loop_start = time.perf_counter()
    written: dict[int, dict[str, int]] = {}
    for part, batches in _rounds(remaining, world_size, total, settings, rank):
        loader = torch.utils.data.DataLoader(_Batches(source, batches, pad_id), batch_size=None)
        context = write_part(settings.split_dir, part, part * settings.samples_per_part, columns,
                             settings.compression) if part is not None else contextlib.nullcontext()
        with context as writer:
            writer_callback.writer = writer
            trainer.predict(loader, return_outputs=False)
        writer_callback.writer = None
        if part is not None:
            written[part] = writer.record
            if settings.remote_split:
                upload_part(settings.split_dir, settings.remote_split, part)
    loop_s = time.perf_counter() - loop_start
    if progress is not None:
        progress.close()
    trainer.close()
    release_shared_memory(source)
    records = dict(kept)
    for rank_written in dist.all_gather_object(written):  # also: every part is written (and uploaded)
        records.update(rank_written)

    summary: dict[str, Any] = {}
    if rank == 0:
        try:
            totals = merge_parts(settings.split_dir, settings.remote_split, records)
        except FileNotFoundError as e:
            if settings.remote_split:
                raise
            raise ConfigError(f'precompute.out.local: {e}: another process wrote it to a folder rank 0 does not '
                              'see (one node\'s own disk?); set precompute.out.remote, or use a folder every '
                              'node shares') from e
        metadata = record.metadata(plan, settings, models, columns, totals, num_parts)
        publish_metadata(settings.split_dir, settings.remote_split, metadata)
        summary = record.summary(metadata)
        wall = time.perf_counter() - start_time
        print(f'precompute-teacher: {summary["samples"]} samples, {summary["tokens"]} tokens, '
              f'{summary["bytes_per_token"]:.1f} bytes/token ({summary["bytes"] / 1e6:.1f} MB), {wall:.1f} s '
              f'({len(remaining)} parts written, {len(kept)} kept) -> {settings.remote_split or settings.split_dir}')
    dist.barrier()
    summary = dist.all_gather_object(summary)[0]
    return {**summary, 'wall_s': time.perf_counter() - start_time, 'loop_s': loop_s, 'parts_written': len(remaining),
            'parts_kept': len(kept), 'complete_before': False}

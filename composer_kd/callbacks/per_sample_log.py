"""``PerSampleLog``: every training sample's CE, KD and top-1 agreement, with its id, step and rank, as CSV.

```yaml
callbacks:
  per_sample_log: {folder: ./runs/{run_name}/samples}
```

Each rank appends its rows to ``samples-rank{R}.csv`` from a background thread, so the training step never
waits on the disk; the rows of every step up to a checkpoint are on disk when it is written, and an autoresumed
run drops the rows past the checkpoint it resumed from, so every sample of a step appears once. At the end of
``fit`` rank 0 merges the rank files into ``samples.csv`` (sorted by step and sample id) and writes
``dataset.json`` (where the train data is, for ``composer-kd samples`` to name each sample's source document).
Columns: ``step, epoch, rank, sample_id, tokens, ce, kd, top1_agreement`` (``kd`` and agreement are empty
without a teacher). The values come from the loss functions on each sample alone (``per_sample_losses``); that
is one more pass over the logits per microbatch, without gradients.
"""

import csv
import json
import os
import queue
import threading
from typing import Any, Optional, TextIO

from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist, format_name_with_dist

from composer_kd.callbacks.unwrap import composer_model

__all__ = ['PerSampleLog', 'COLUMNS', 'MERGED_FILE', 'DATASET_FILE']

COLUMNS = ('step', 'epoch', 'rank', 'sample_id', 'tokens', 'ce', 'kd', 'top1_agreement')
MERGED_FILE = 'samples.csv'
DATASET_FILE = 'dataset.json'


def _number(value: float) -> str:
    return '' if value != value else repr(float(value))  # NaN (no teacher) as an empty cell


class PerSampleLog(Callback):
    """Writes per-sample losses of every training batch (see the module).

    Args:
        folder (str): output folder; ``{run_name}`` is filled in. Default: ``'./runs/{run_name}/samples'``.
    """

    def __init__(self, folder: str = './runs/{run_name}/samples') -> None:
        self.folder_template = folder
        self.folder: Optional[str] = None
        self._file: Optional[TextIO] = None
        self._queue: 'queue.Queue[Optional[list[list[Any]]]]' = queue.Queue()
        self._thread: Optional[threading.Thread] = None

    def _path(self, rank: int) -> str:
        assert self.folder is not None
        return os.path.join(self.folder, f'samples-rank{rank}.csv')

    def fit_start(self, state: State, logger: Logger) -> None:
        self.folder = os.path.abspath(format_name_with_dist(self.folder_template, state.run_name))
        os.makedirs(self.folder, exist_ok=True)
        path, resumed_at = self._path(dist.get_global_rank()), int(state.timestamp.batch)
        kept: list[dict[str, str]] = []
        if os.path.isfile(path):  # an autoresume keeps the rows of the steps its checkpoint holds
            with open(path, newline='') as f:
                kept = [row for row in csv.DictReader(f) if int(row['step']) < resumed_at]
        self._file = open(path, 'w', newline='')
        writer = csv.writer(self._file)
        writer.writerow(COLUMNS)
        writer.writerows([row[c] for c in COLUMNS] for row in kept)
        self._file.flush()
        self._thread = threading.Thread(target=self._write_rows, args=(writer,), daemon=True,
                                        name='composer-kd-per-sample-log')
        self._thread.start()

    def _write_rows(self, writer: Any) -> None:
        while True:
            rows = self._queue.get()
            try:
                if rows is None:
                    return
                writer.writerows(rows)
            finally:
                self._queue.task_done()

    def before_train_batch(self, state: State, logger: Logger) -> None:
        # Not BATCH_START: an out-of-memory retry reruns the batch's microbatches from here (see KDMonitor).
        composer_model(state).sample_records = []

    def after_train_batch(self, state: State, logger: Logger) -> None:
        model = composer_model(state)
        records, model.sample_records = model.sample_records, None
        step, epoch, rank = int(state.timestamp.batch), int(state.timestamp.epoch), dist.get_global_rank()
        rows = []
        for record in records or []:
            for i, sample_id in enumerate(record['sample_id'].tolist()):
                rows.append([step, epoch, rank, sample_id, int(record['tokens'][i]), _number(record['ce'][i]),
                             _number(record['kd'][i]), _number(record['top1_agreement'][i])])
        self._queue.put(rows)

    def _flush(self) -> None:
        self._queue.join()
        if self._file is not None:
            self._file.flush()

    def batch_checkpoint(self, state: State, logger: Logger) -> None:
        self._flush()

    def epoch_checkpoint(self, state: State, logger: Logger) -> None:
        self._flush()

    def fit_end(self, state: State, logger: Logger) -> None:
        self._flush()
        dist.barrier()  # every rank's file is complete
        if dist.get_global_rank() == 0:
            self._merge(state)
        dist.barrier()

    def _merge(self, state: State) -> None:
        assert self.folder is not None
        rows = []
        for rank in range(dist.get_world_size()):
            with open(self._path(rank), newline='') as f:
                rows += list(csv.DictReader(f))
        rows.sort(key=lambda row: (int(row['step']), int(row['sample_id'])))
        tmp = os.path.join(self.folder, MERGED_FILE + '.tmp')
        with open(tmp, 'w', newline='') as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, os.path.join(self.folder, MERGED_FILE))
        dataset = getattr(state.train_dataloader, 'dataset', None)
        streams = getattr(dataset, 'streams', None) or [None]
        info = {key: getattr(streams[0], key, None) for key in ('local', 'remote', 'split')}
        with open(os.path.join(self.folder, DATASET_FILE), 'w') as f:
            json.dump(info, f, indent=2)

    def close(self, state: State, logger: Logger) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        if self._file is not None:
            self._file.close()
            self._file = None

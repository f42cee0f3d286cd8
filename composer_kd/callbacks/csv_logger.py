"""``CSVLogger``: every logged metric as a CSV row, for pandas and spreadsheets (Composer has no CSV logger).

```yaml
loggers:
  csv: {filename: ./runs/{run_name}/metrics.csv}
```

One row per metric value: ``batch, epoch, sample, token, name, value`` (long format: metrics appear and disappear
over a run, e.g. eval ones). Rank 0 writes; rows are flushed at every checkpoint and at the end of the run. An
autoresumed run appends to the same file, dropping the rows past the checkpoint it resumed from, so every batch
appears once.
"""

import csv
import os
from typing import Any, Optional, TextIO

from composer.core import State
from composer.loggers import Logger, LoggerDestination
from composer.utils import dist, format_name_with_dist

__all__ = ['CSVLogger']

COLUMNS = ('batch', 'epoch', 'sample', 'token', 'name', 'value')


class CSVLogger(LoggerDestination):
    """Writes ``log_metrics`` calls to ``filename`` (``{run_name}`` and Composer's other fields are filled in).

    Args:
        filename (str): the CSV file. Default: ``'{run_name}/metrics.csv'``.
    """

    def __init__(self, filename: str = '{run_name}/metrics.csv') -> None:
        self.filename = filename
        self._file: Optional[TextIO] = None
        self._writer: Any = None
        self._state: Optional[State] = None

    def init(self, state: State, logger: Logger) -> None:
        self._state = state

    def fit_start(self, state: State, logger: Logger) -> None:
        if dist.get_global_rank() != 0 or self._file is not None:
            return
        path = format_name_with_dist(self.filename, state.run_name)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        resumed_at = int(state.timestamp.batch)
        kept = []
        if resumed_at > 0 and os.path.isfile(path):  # an autoresume: keep what came before the checkpoint
            with open(path, newline='') as f:
                # Rows at the checkpoint's own batch are its evaluation (it ran before the checkpoint was written,
                # and the resumed run does not repeat it); later rows are redone by the resumed run.
                kept = [row for row in csv.DictReader(f) if int(row['batch']) < resumed_at or
                        int(row['batch']) == resumed_at and row['name'].startswith('metrics/eval/')]
        self._file = open(path, 'w', newline='')
        self._writer = csv.DictWriter(self._file, fieldnames=COLUMNS)
        self._writer.writeheader()
        self._writer.writerows(kept)

    def log_metrics(self, metrics: dict[str, Any], step: Optional[int] = None) -> None:
        if self._writer is None or self._state is None:
            return
        ts = self._state.timestamp
        where = {'batch': int(ts.batch) if step is None else step, 'epoch': int(ts.epoch), 'sample': int(ts.sample),
                 'token': int(ts.token)}
        for name, value in metrics.items():
            if hasattr(value, 'item') and getattr(value, 'numel', lambda: 1)() == 1:
                value = value.item()
            if isinstance(value, (int, float)):
                self._writer.writerow({**where, 'name': name, 'value': value})

    def batch_checkpoint(self, state: State, logger: Logger) -> None:
        if self._file is not None:
            self._file.flush()

    def fit_end(self, state: State, logger: Logger) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self, state: State, logger: Logger) -> None:
        if self._file is not None:
            self._file.close()
            self._file, self._writer = None, None

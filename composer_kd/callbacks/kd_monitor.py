"""``KDMonitor``: distillation statistics of the training batches, every ``interval`` batches, to every logger.

```yaml
callbacks:
  kd_monitor: {interval: 10}
```

On a monitored batch the model adds, per microbatch, the sums of ``composer_kd.losses.stats`` (student and teacher
entropy, top-1 agreement) and of the loss's CE and KD terms over the scored tokens, from the logits the loss
already has; the callback sums them over ranks and logs per-token means as ``kd/train/{ce, kd,
student_entropy, teacher_entropy, top1_agreement}``. Other batches cost nothing.
"""

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist

from composer_kd.callbacks.unwrap import composer_model

__all__ = ['KDMonitor']


class KDMonitor(Callback):
    """Logs ``kd/train/*`` every ``interval`` batches (see the module).

    Args:
        interval (int): batches between two monitored batches (the first batch is monitored). Default: ``10``.
    """

    def __init__(self, interval: int = 10) -> None:
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f'interval must be a positive integer, got {interval!r}')
        self.interval = interval

    def before_train_batch(self, state: State, logger: Logger) -> None:
        # Not BATCH_START: Composer reruns a batch's microbatches after an out-of-memory error (microbatch size
        # 'auto') from here, without a new BATCH_START, and its sums must start again with them.
        model = composer_model(state)
        model.stat_sums = {} if int(state.timestamp.batch) % self.interval == 0 else None

    def after_train_batch(self, state: State, logger: Logger) -> None:
        # Before the timestamp moves on, so the values sit at the same step as Composer's loss/train/*.
        model = composer_model(state)
        sums, model.stat_sums = model.stat_sums, None
        if sums is None:
            return
        # Every rank monitors the same batches, so every rank joins this reduction.
        names = sorted(sums)
        packed = torch.stack([sums[name].to(torch.float64) for name in names])
        dist.all_reduce(packed, reduce_operation='SUM')
        totals = dict(zip(names, packed.tolist()))
        tokens = max(totals.pop('tokens'), 1.0)
        logger.log_metrics({f'kd/train/{name}': value / tokens for name, value in totals.items()})

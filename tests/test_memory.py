"""A long run does not leak: 1,000 CPU steps of the tiny recipe (teacher, evals, checkpoints, logging as
shipped), resident memory after warm-up grows by at most 50 MB."""

import psutil
import pytest
from composer.core import Callback, State
from composer.loggers import Logger
from reliability import record

from composer_kd.run.config import load_config
from composer_kd.run.train import build_trainer

pytestmark = pytest.mark.launcher  # slow: about a minute

WARM_UP, STEPS, LIMIT_MB = 100, 1000, 50


class _Resident(Callback):

    def __init__(self) -> None:
        self.mb: dict[int, float] = {}

    def batch_end(self, state: State, logger: Logger) -> None:
        batch = int(state.timestamp.batch)
        if batch in (WARM_UP, STEPS) or batch % 100 == 0:
            self.mb[batch] = psutil.Process().memory_info().rss / 2**20


def test_a_thousand_steps_do_not_grow_resident_memory(write_config) -> None:
    config = write_config(**{'max_duration': f'{STEPS}ba', 'log_to_console': False})
    trainer = build_trainer(load_config(str(config)))
    resident = _Resident()
    trainer.state.callbacks.append(resident)
    trainer.fit()
    trainer.close()
    growth = resident.mb[STEPS] - resident.mb[WARM_UP]
    assert growth <= LIMIT_MB, resident.mb
    record(f'{STEPS} steps of the tiny recipe (teacher, evals every 20 batches, checkpoints, loggers)',
           f'resident memory {resident.mb[WARM_UP]:.0f} MB after {WARM_UP} steps, {resident.mb[STEPS]:.0f} MB '
           f'after {STEPS} ({growth:+.1f} MB)', lost='nothing')

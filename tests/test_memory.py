"""A long run does not leak: 600 CPU steps of the tiny recipe (teacher, evals, checkpoints, logging as
shipped), resident memory after warm-up grows by at most 50 MB. The run is a process of its own, so the figure is
a training process's, not pytest's (whose heap, after hundreds of tests, would also slow every scheduled GC)."""

import json
import subprocess
import sys

import pytest
from reliability import record

pytestmark = pytest.mark.launcher  # slow: about a minute

WARM_UP, STEPS, LIMIT_MB = 100, 600, 50

# Trains the recipe given as argv[1] and prints {batch: resident MB} at every 100th batch as its last line.
_RUN = f'''
import json, sys
import psutil
from composer.core import Callback
from composer_kd.config.run_config import load_config
from composer_kd.run.train import build_trainer

class Resident(Callback):
    def __init__(self):
        self.mb = {{}}
    def batch_end(self, state, logger):
        batch = int(state.timestamp.batch)
        if batch in ({WARM_UP}, {STEPS}) or batch % 100 == 0:
            self.mb[batch] = psutil.Process().memory_info().rss / 2**20

trainer = build_trainer(load_config(sys.argv[1]))
resident = Resident()
trainer.state.callbacks.append(resident)
trainer.fit()
trainer.close()
print(json.dumps(resident.mb))
'''


def test_six_hundred_steps_do_not_grow_resident_memory(write_config) -> None:
    config = write_config(**{'max_duration': f'{STEPS}ba', 'log_to_console': False})
    done = subprocess.run([sys.executable, '-c', _RUN, str(config)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    mb = {int(batch): value for batch, value in json.loads(done.stdout.strip().splitlines()[-1]).items()}
    growth = mb[STEPS] - mb[WARM_UP]
    assert growth <= LIMIT_MB, mb
    record(f'{STEPS} steps of the tiny recipe (teacher, evals every 20 batches, checkpoints, loggers)',
           f'resident memory {mb[WARM_UP]:.0f} MB after {WARM_UP} steps, {mb[STEPS]:.0f} MB '
           f'after {STEPS} ({growth:+.1f} MB)', lost='nothing')

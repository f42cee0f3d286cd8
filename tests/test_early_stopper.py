"""The YAML ``early_stopper`` keeps its state in the checkpoint: an early-stopped run that autoresumes stays
stopped, and a run interrupted mid-patience keeps its count (Composer's own ``EarlyStopper`` does neither)."""

from pathlib import Path

import torch

from composer_kd.callbacks import StatefulEarlyStopper
from composer_kd.config.run_config import load_config
from composer_kd.run.train import train

# lr = 0: the eval cross-entropy never improves after the first eval (batch 1), so a 3-batch patience stops the
# run once batch - 1 > 3, at batch 5 — wherever the run was interrupted.
STOPPER = {'monitor': 'LanguageCrossEntropy', 'patience': '3ba'}
EDITS = {'eval_interval': '1ba', 'eval_subset_num_batches': 1, 'optimizer.lr': 0.0, 'save_interval': '1ba',
         'autoresume': True, 'callbacks.early_stopper': STOPPER}


def _run(config: Path, *overrides: str) -> tuple[int, StatefulEarlyStopper]:
    trainer = train(load_config(str(config), list(overrides)))
    stopper = next(c for c in trainer.state.callbacks if isinstance(c, StatefulEarlyStopper))
    batch = int(trainer.state.timestamp.batch)
    trainer.close()
    return batch, stopper


def test_a_stopped_run_stays_stopped_after_autoresume(tmp_path: Path, write_config) -> None:
    config = write_config(max_duration='30ba', **EDITS)
    batch, stopper = _run(config)
    assert batch == 5 and stopper.stopped_at == 5 and stopper.comp_func is torch.less
    checkpoints = tmp_path / 'runs' / 'tiny-cpu' / 'checkpoints'
    assert (checkpoints / 'ep0-ba5-rank0.pt').is_file()
    # The same command again: autoresume loads batch 5 and the stopper's record, and trains no further.
    batch, stopper = _run(config)
    assert batch == 5 and stopper.stopped_at == 5
    assert not (checkpoints / 'ep0-ba6-rank0.pt').exists()


def test_an_interrupted_run_keeps_its_patience_count(tmp_path: Path, write_config) -> None:
    config = write_config(max_duration='3ba', **EDITS)
    batch, stopper = _run(config)  # ends mid-patience: best at batch 1, 2 batches without improvement
    assert batch == 3 and stopper.stopped_at is None and int(stopper.best_occurred.batch) == 1
    batch, stopper = _run(config, 'max_duration=30ba')
    assert batch == 5 and stopper.stopped_at == 5 and int(stopper.best_occurred.batch) == 1

"""The private internals of our dependencies that composer-kd relies on, where no public API does the job: each test
names the internal, where we use it and why, so that an upgrade that moves it fails here, by name, rather than as a
hang or a wrong number somewhere else."""

import inspect

import pytest


def _source(obj: object) -> str:
    return inspect.getsource(obj)


def test_streaming_shard_states() -> None:
    """data/tokens.py (TokenDataset.prepare_shard) sets a shard that failed to prepare back to REMOTE through
    StreamingDataset._shard_states, so that readers waiting for it stop waiting (Streaming 0.13 leaves it PREPARING
    and they spin forever); TokenDataset.on_exception sets StreamingDataset._event to stop the way Streaming does."""
    from streaming import StreamingDataset
    from streaming.base.dataset import _ShardState
    assert {'REMOTE', 'PREPARING', 'LOCAL'} <= set(_ShardState.__members__), \
        'streaming.base.dataset._ShardState changed: review TokenDataset.prepare_shard (data/tokens.py)'
    init, prepare = _source(StreamingDataset.__init__), _source(StreamingDataset.prepare_shard)
    assert '_shard_states' in prepare and '_ShardState.PREPARING' in prepare, \
        'StreamingDataset.prepare_shard no longer uses _shard_states: review TokenDataset.prepare_shard'
    assert 'self._event' in _source(StreamingDataset.on_exception) and '_event' in _source(StreamingDataset), \
        'StreamingDataset.on_exception no longer sets _event: review TokenDataset.on_exception (data/tokens.py)'
    assert 'on_exception' in _source(StreamingDataset) and init


def test_composer_clears_should_save_peft_only_for_the_whole_model() -> None:
    """model/distillation_model.py (_whole_model): Composer clears HuggingFaceModel.should_save_peft_only while
    FSDP2 broadcasts rank 0's weights (get_full_state_dict), and the teachers must travel then; its LoadCheckpoint
    callback clears it too (load_state_dict then loads teachers only from a state that holds them)."""
    from composer.callbacks.load_checkpoint import LoadCheckpoint
    from composer.distributed import prepare_distributed
    assert 'should_save_peft_only = False' in _source(prepare_distributed.get_full_state_dict), \
        'composer.distributed.prepare_distributed.get_full_state_dict changed: review DistillationModel._whole_model'
    assert 'get_full_state_dict' in _source(prepare_distributed), \
        'Composer no longer broadcasts under get_full_state_dict: review DistillationModel._whole_model'
    assert 'should_save_peft_only = False' in _source(LoadCheckpoint._load), \
        'LoadCheckpoint no longer clears should_save_peft_only: review DistillationModel.load_state_dict'


def test_checkpoint_writers_live_where_train_looks_for_them() -> None:
    """run/train.py (_checkpoint_write_failure) tells a failed checkpoint write (disk full, quota, read-only) from
    another OSError by the files of the traceback's frames: Composer's checkpoint_saver.py and utils/checkpoint.py."""
    from composer.callbacks import checkpoint_saver
    from composer.utils import checkpoint
    assert checkpoint_saver.__file__.endswith('checkpoint_saver.py'), checkpoint_saver.__file__
    assert checkpoint.__file__.endswith('utils/checkpoint.py'), checkpoint.__file__
    assert 'save_checkpoint' in _source(checkpoint_saver.CheckpointSaver), \
        'CheckpointSaver no longer writes through composer.utils.checkpoint: review _checkpoint_write_failure'
    assert callable(checkpoint.save_checkpoint)


def test_fsdp2_mixed_precision_state() -> None:
    """model/generation.py (no_fsdp2_input_casts) turns FSDP2's forward-input cast off while generating through
    FSDPModule._get_fsdp_state()._mp_policy (the cast copies Hugging Face's KV cache each step)."""
    import dataclasses

    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy
    from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPState
    assert hasattr(FSDPModule, '_get_fsdp_state'), 'FSDPModule._get_fsdp_state is gone: review no_fsdp2_input_casts'
    assert '_mp_policy' in _source(FSDPState), 'FSDPState._mp_policy is gone: review no_fsdp2_input_casts'
    assert 'cast_forward_inputs' in {f.name for f in dataclasses.fields(MixedPrecisionPolicy)}


def test_composer_early_stopper_update() -> None:
    """callbacks/early_stopper.py (StatefulEarlyStopper) extends EarlyStopper._update_stopper_state to checkpoint
    the stopper's state."""
    from composer.callbacks import EarlyStopper
    assert callable(getattr(EarlyStopper, '_update_stopper_state', None)), \
        'EarlyStopper._update_stopper_state is gone: review StatefulEarlyStopper'
    params = inspect.signature(EarlyStopper._update_stopper_state).parameters
    assert list(params) == ['self', 'state'], params


@pytest.mark.parametrize('module', ['composer_kd.data.tokens', 'composer_kd.model.distillation_model',
                                    'composer_kd.run.train', 'composer_kd.model.generation',
                                    'composer_kd.callbacks.early_stopper'])
def test_each_use_points_here(module: str) -> None:
    """Each module that relies on one of these internals names this file, so a reader finds the guard."""
    import importlib
    assert 'test_dependency_internals.py' in _source(importlib.import_module(module)), module

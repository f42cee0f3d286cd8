"""``hf_checkpointer``: the student as a Hugging Face folder (``save_pretrained`` + tokenizer) while training, LLM
Foundry's callback of the same name and keys.

Every ``save_interval`` and at the end of training the student's full weights are gathered on rank 0 (under FSDP
too: every rank takes part in the gather, rank 0 alone writes) and written, in ``precision``, as
``{save_folder}/huggingface/ba{batch}`` — a local folder, or an object store Composer can upload to
(``s3://``, ``oci://``, ``gs://``, ``dbfs:/Volumes``; ``libcloud://CONTAINER`` with ``backend_kwargs`` for
Apache Libcloud's providers). A local folder is written all at once (no half-written model under its name).
"""

import json
import os
import shutil
import tempfile
from typing import Any, Optional

import torch
from composer.core import Callback, Event, State
from composer.loggers import Logger
from composer.utils import create_interval_scheduler, dist, format_name_with_dist, parse_uri
from composer.utils.file_helpers import maybe_create_object_store_from_uri
from composer.utils.object_store import LibcloudObjectStore, ObjectStore
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from composer_kd.callbacks.unwrap import composer_model

__all__ = ['HuggingFaceCheckpointer']

_PRECISIONS = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}
_CHECKPOINT_EVENTS = (Event.BATCH_CHECKPOINT, Event.EPOCH_CHECKPOINT, Event.ITERATION_CHECKPOINT)


def _set_config_dtype(path: str, precision: str) -> None:
    """``save_pretrained`` records the in-memory model's dtype; the files hold ``precision``."""
    with open(path) as f:
        config = json.load(f)
    config['torch_dtype'] = precision
    with open(path, 'w') as f:
        json.dump(config, f, indent=2, sort_keys=True)


class HuggingFaceCheckpointer(Callback):
    """Writes the student as a ``save_pretrained`` folder with its tokenizer while training.

    Args:
        save_folder (str): local folder or object-store URI; ``{run_name}`` is filled in.
        save_interval (str | int): Composer time (``500ba``, ``1ep``; an int is epochs); also at the end.
        precision (str): ``float32``, ``bfloat16`` or ``float16`` for the written weights. Default: ``float32``.
        overwrite (bool): replace a folder already there for that batch. Default: ``True``.
        backend_kwargs (dict, optional): for ``libcloud://``: ``provider``, ``container``, ``provider_kwargs``.
    """

    def __init__(self, save_folder: str, save_interval: str | int, precision: str = 'float32', overwrite: bool = True,
                 backend_kwargs: Optional[dict[str, Any]] = None) -> None:
        if precision not in _PRECISIONS:
            raise ValueError(f'precision must be one of {list(_PRECISIONS)}, got {precision!r}')
        backend, _, _ = parse_uri(save_folder)
        if backend == 'libcloud' and not backend_kwargs:
            raise ValueError('a libcloud:// save_folder needs backend_kwargs (provider, container, provider_kwargs)')
        self.save_folder = save_folder
        self.precision = precision
        self.overwrite = overwrite
        self.backend_kwargs = backend_kwargs
        self._due = create_interval_scheduler(save_interval, include_end_of_training=True)
        self._store: Optional[ObjectStore] = None
        self._last_batch = -1

    def _object_store(self, folder: str) -> Optional[ObjectStore]:
        backend, _, _ = parse_uri(folder)
        if backend == '':
            return None
        if self._store is None:
            self._store = LibcloudObjectStore(**self.backend_kwargs) if backend == 'libcloud' else \
                maybe_create_object_store_from_uri(folder)
        return self._store

    def run_event(self, event: Event, state: State, logger: Logger) -> None:
        due = event in _CHECKPOINT_EVENTS and state.get_elapsed_duration() is not None and self._due(state, event)
        # FIT_END: a run stopped early (early stopper, SIGTERM) still leaves its last student.
        if (due or event == Event.FIT_END) and self._last_batch != int(state.timestamp.batch):
            self._save(state)

    def _save(self, state: State) -> None:
        model = composer_model(state)
        student = model.model
        # Every rank takes part (FSDP gathers the shards); rank 0 receives the full weights, offloaded to CPU.
        weights = get_model_state_dict(student, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        # Tied weights arrive as separate copies; keep one name per parameter, as export and save_pretrained do.
        named = {*dict(student.named_parameters()), *dict(student.named_buffers())}
        weights = {k: v for k, v in weights.items() if k in named}
        batch = int(state.timestamp.batch)
        folder = format_name_with_dist(self.save_folder, state.run_name).rstrip('/') + f'/huggingface/ba{batch}'
        if dist.get_global_rank() == 0:
            dtype = _PRECISIONS[self.precision]
            weights = {k: v.to(dtype) if v.is_floating_point() else v for k, v in weights.items()}
            with tempfile.TemporaryDirectory() as tmp:
                local = os.path.join(tmp, 'model')
                student.save_pretrained(local, state_dict=weights, safe_serialization=True)
                _set_config_dtype(os.path.join(local, 'config.json'), self.precision)
                if model.tokenizer is not None:
                    model.tokenizer.save_pretrained(local)
                self._publish(local, folder)
        self._last_batch = batch
        dist.barrier()

    def _publish(self, local: str, folder: str) -> None:
        store = self._object_store(folder)
        if store is None:
            if os.path.exists(folder):
                if not self.overwrite:
                    raise FileExistsError(f'hf_checkpointer: {folder} exists (overwrite: false)')
                shutil.rmtree(folder)
            os.makedirs(os.path.dirname(os.path.abspath(folder)), exist_ok=True)
            staging = f'{folder}.partial'
            shutil.rmtree(staging, ignore_errors=True)
            shutil.copytree(local, staging)
            os.replace(staging, folder)
            return
        _, _, path = parse_uri(folder)
        for name in sorted(os.listdir(local)):
            store.upload_object(f'{path}/{name}', os.path.join(local, name))

"""``composer-kd export``: the student of a Composer checkpoint → a Hugging Face ``save_pretrained`` folder
(safetensors weights, config, tokenizer).

The checkpoint embeds the student's config and tokenizer (``HuggingFaceModel.get_metadata``) and holds the
student's weights under ``model.*`` (the teacher is never saved), so no other input is needed.

Composer checkpoints are pickles. They are read with ``torch.load(weights_only=True)`` and an allowlist of the
plain types a Composer 0.32 checkpoint holds (time deltas, NumPy arrays and dtypes of the RNG state, the torch
version); a checkpoint that needs anything else is refused by name unless the caller trusts it
(``--trust-pickle``). A sharded checkpoint's ``.metadata`` is a pickle that torch reads itself: trusted input.
"""

import datetime
import os
import pickle
import re
import tempfile
import zipfile
from typing import Any

import numpy as np
import torch
from composer.models import HuggingFaceModel
from composer.models.huggingface import get_hf_config_from_composer_state_dict
from torch.torch_version import TorchVersion
from transformers import AutoModelForCausalLM

from composer_kd.errors import ConfigError

__all__ = ['export_student', 'load_checkpoint', 'download_sharded']

_STUDENT_PREFIX = 'model.'


# What a Composer 0.32.1 checkpoint pickles besides tensors and containers (found by loading real ones).
SAFE_CHECKPOINT_GLOBALS = [
    datetime.timedelta, TorchVersion, np.ndarray, np.dtype, np._core.multiarray._reconstruct,
    (np._core.multiarray._reconstruct, 'numpy.core.multiarray._reconstruct'),  # as NumPy 1 wrote it
    *(getattr(np.dtypes, name) for name in np.dtypes.__all__),
]


def _torch_load(path: str, shown: str, trust_pickle: bool) -> dict[str, Any]:
    if not zipfile.is_zipfile(path):
        raise ConfigError(f'checkpoint: {shown} is not a Composer checkpoint (not a torch.save file)')
    if trust_pickle:
        return torch.load(path, map_location='cpu', weights_only=False)
    try:
        with torch.serialization.safe_globals(SAFE_CHECKPOINT_GLOBALS):
            return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        match = re.search(r'GLOBAL ([\w.]+)|but got <class \'([\w.]+)\'>', str(e))
        found = next(g for g in match.groups() if g) if match else 'an object torch will not load safely'
        raise ConfigError(f'checkpoint: {shown} holds objects outside the safe list ({found}); it is a pickle that '
                          'can run code: pass --trust-pickle only if you trust its source') from e
    except (RuntimeError, EOFError) as e:
        reason = str(e).splitlines()[0][:160]
        raise ConfigError(f'checkpoint: {shown} cannot be read ({reason}); is it complete?') from e


def _load_sharded_model(path: str) -> dict[str, Any]:
    """The model weights and the Hugging Face metadata of a sharded checkpoint, read alone: the optimizer state
    (twice the model for Adam) and the rest stay on disk. Returns them nested as a monolithic checkpoint nests
    them (``{'state': {'model': ..., 'integrations': ...}}``)."""
    from torch.distributed.checkpoint import FileSystemReader, load
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    reader = FileSystemReader(path)
    metadata = reader.read_metadata()
    wanted = {}
    for key, item in metadata.state_dict_metadata.items():
        if key.startswith(('state.model.', 'state.integrations.')):
            tensor = isinstance(item, TensorStorageMetadata)
            wanted[key] = torch.empty(item.size, dtype=item.properties.dtype) if tensor else b''
    # Not flattened by the planner: it must fill this very dict (the metadata's bytes are set into it).
    planner = DefaultLoadPlanner(flatten_state_dict=False, flatten_sharded_tensors=False, allow_partial_load=True)
    load(wanted, storage_reader=reader, planner=planner, no_dist=True)
    nested: dict[str, Any] = {}
    for key, value in wanted.items():
        *parents, leaf = metadata.planner_data[key]
        node = nested
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = value
    return _lists(nested)


def _lists(node: Any) -> Any:
    """Flattening keyed list items by their index: a dict with the keys 0..n-1 was a list."""
    if not isinstance(node, dict):
        return node
    items = {k: _lists(v) for k, v in node.items()}
    if items and all(isinstance(k, int) for k in items) and sorted(items) == list(range(len(items))):
        return [items[i] for i in range(len(items))]
    return items


def download_sharded(store: Any, prefix: str, folder: str) -> str:
    """The objects under ``prefix`` of a Composer ``ObjectStore`` (a sharded checkpoint: ``.metadata`` and the
    ``__*.distcp`` files) downloaded into ``folder``; returns it."""
    prefix = prefix.strip('/') + '/'
    names = [name for name in store.list_objects(prefix) if name.startswith(prefix)]
    if not any(name.endswith('/.metadata') for name in names):
        raise ConfigError(f'checkpoint: no sharded checkpoint (.metadata) under {prefix}')
    for name in names:
        local = os.path.join(folder, name[len(prefix):])
        os.makedirs(os.path.dirname(local), exist_ok=True)
        store.download_object(name, local)
    return folder


def _fetch(uri: str, folder: str) -> str:
    """A remote checkpoint downloaded into ``folder``; returns the local path: a ``.pt`` file through Composer's
    ``get_file`` (``s3://``, ``oci://``, ``gs://``, ``dbfs:/``, ``http(s)://``), a sharded folder through the
    object store's listing (not over HTTP)."""
    from composer.utils import get_file, parse_uri
    from composer.utils.file_helpers import maybe_create_object_store_from_uri
    try:
        if uri.rstrip('/').endswith('.pt'):
            local = os.path.join(folder, 'checkpoint.pt')
            get_file(uri, local)
            return local
        if uri.lower().startswith(('http://', 'https://')):
            raise ConfigError(f'checkpoint: {uri}: over HTTP a checkpoint must be a .pt file (a sharded folder '
                              'cannot be listed)')
        return download_sharded(maybe_create_object_store_from_uri(uri), parse_uri(uri)[2], folder)
    except (FileNotFoundError, NotImplementedError, ValueError, OSError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f'checkpoint: cannot download {uri}: {str(e).splitlines()[0] if str(e) else e!r}') from e


def load_checkpoint(path: str, trust_pickle: bool = False) -> dict[str, Any]:
    """Loads a monolithic (``.pt``, local or remote) or sharded (folder with ``.metadata``) Composer checkpoint
    onto the CPU, without running pickled code unless ``trust_pickle``; of a sharded one, the model and its
    metadata only."""
    if '://' in path or path.startswith('dbfs:/'):
        with tempfile.TemporaryDirectory() as tmp:
            local = _fetch(path, tmp)
            return _load_sharded_model(local) if os.path.isdir(local) else _torch_load(local, path, trust_pickle)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, '.metadata')):
            raise ConfigError(f'checkpoint: {path} is a folder without a sharded checkpoint (.metadata) in it')
        return _load_sharded_model(path)
    if not os.path.isfile(path):
        raise ConfigError(f'checkpoint: no such file or folder: {path}')
    return _torch_load(path, path, trust_pickle)


def export_student(checkpoint: str, out_dir: str, overwrite: bool = False, trust_pickle: bool = False) -> str:
    """Writes the checkpoint's student (weights, config, tokenizer) to ``out_dir``; returns ``out_dir``.

    Raises:
        ConfigError: for a missing checkpoint, one not written by a ``DistillationModel``/``HuggingFaceModel``,
            or a non-empty ``out_dir`` without ``overwrite``.
    """
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise ConfigError(f'out_dir: {out_dir} is not empty (pass --overwrite to write into it)')
    state = load_checkpoint(checkpoint, trust_pickle)
    hf_state = state.get('state', {}).get('integrations', {}).get('huggingface')
    if hf_state is None:
        raise ConfigError(f'checkpoint: {checkpoint} has no Hugging Face metadata (not a composer-kd checkpoint)')
    config = get_hf_config_from_composer_state_dict(state)
    student = AutoModelForCausalLM.from_config(config)
    weights = {
        k[len(_STUDENT_PREFIX):]: v for k, v in state['state']['model'].items() if k.startswith(_STUDENT_PREFIX)
    }
    missing, unexpected = student.load_state_dict(weights, strict=False)
    missing = [k for k in missing if k not in (getattr(student, '_tied_weights_keys', None) or ())]
    if missing or unexpected:
        raise ConfigError(f'checkpoint: student weights do not fit the saved config (missing {missing[:3]}, '
                          f'unexpected {unexpected[:3]})')
    student.tie_weights()
    os.makedirs(out_dir, exist_ok=True)
    student.save_pretrained(out_dir, safe_serialization=True)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = HuggingFaceModel.load_huggingface_tokenizer_from_saved_state(hf_state, tokenizer_save_dir=tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return out_dir

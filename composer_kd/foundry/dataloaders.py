"""composer-kd's token loaders as LLM Foundry dataloaders.

``composer_kd_precomputed``: a precomputed teacher's data (``precompute-teacher``): token batches that carry the
teacher's top-k, for ``model.teacher: {precomputed: true}`` under ``llmfoundry train``.

```yaml
train_loader:
  name: composer_kd_precomputed
  dataset: {local: ./topk, split: train, max_seq_len: 2048, shuffle: true}
  drop_last: true
```

Foundry calls ``build_precomputed_dataloader(tokenizer=..., device_batch_size=..., **train_loader_minus_name)``;
the batches' rest mass is the one recorded at the run's distillation temperature, which the ``composer_kd``
config transform copies here as ``teacher_temperature``. (Online distillation uses Foundry's own ``text``
loader as it is; ``composer_kd_tokens`` reads the same token MDS data as composer-kd's own loader does, with each
sample's ``sample_id``, which ``per_sample_log`` needs and Foundry's ``text`` batches lack.)
"""

from typing import Any, Mapping, Optional

from composer.core import DataSpec

from composer_kd.data.teacher_topk import read_metadata
from composer_kd.data.tokens import build_token_dataloader
from composer_kd.errors import ConfigError

__all__ = ['build_precomputed_dataloader', 'build_tokens_dataloader']


def build_precomputed_dataloader(tokenizer: Any, device_batch_size: int, dataset: Mapping[str, Any],
                                 teacher_temperature: float = 1.0, drop_last: bool = True, num_workers: int = 0,
                                 pin_memory: bool = False, prefetch_factor: Optional[int] = None,
                                 persistent_workers: bool = False, timeout: float = 0) -> DataSpec:
    """The ``DataSpec`` of a precomputed teacher's MDS split (see the module).

    Raises:
        ConfigError: for a split without a precomputed teacher, or one that did not record ``teacher_temperature``.
    """
    meta = read_metadata(dataset.get('local'), dataset.get('remote'), dataset.get('split'))
    if meta is None:
        raise ConfigError(f'train_loader.dataset: no precomputed teacher at {dataset.get("remote") or dataset.get("local")}'
                          ' (composer-kd precompute-teacher writes one); use name: text for online distillation')
    if not any(abs(teacher_temperature - t) < 1e-9 for t in meta['temperatures']):
        raise ConfigError(f'model.distillation.temperature={teacher_temperature:g}: the precomputed teacher records '
                          f'temperatures {meta["temperatures"]}')
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    return build_token_dataloader(dataset, device_batch_size, pad, teacher_temperature=teacher_temperature,
                                  drop_last=drop_last, num_workers=num_workers, pin_memory=pin_memory,
                                  prefetch_factor=prefetch_factor, persistent_workers=persistent_workers,
                                  timeout=timeout, vocab_size=len(tokenizer), key='train_loader')


def build_tokens_dataloader(tokenizer: Any, device_batch_size: int, dataset: Mapping[str, Any], drop_last: bool = True,
                            num_workers: int = 0, pin_memory: bool = False, prefetch_factor: Optional[int] = None,
                            persistent_workers: bool = False, timeout: float = 0) -> DataSpec:
    """``composer_kd_tokens``: the ``DataSpec`` of a token MDS split (``tokens`` column, as Foundry's ``text``
    loader reads with ``--concat_tokens`` data), batches with ``sample_id`` (see the module)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    return build_token_dataloader(dataset, device_batch_size, pad, drop_last=drop_last, num_workers=num_workers,
                                  pin_memory=pin_memory, prefetch_factor=prefetch_factor,
                                  persistent_workers=persistent_workers, timeout=timeout, vocab_size=len(tokenizer),
                                  key='train_loader')

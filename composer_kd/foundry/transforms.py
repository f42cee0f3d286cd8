"""``composer_kd``: the config transform LLM Foundry applies to every run config before it validates it. It does
nothing unless ``model.name`` is ``composer_kd_distillation``; then:

* Foundry reads ``init_device`` from the top of the model block only (``mixed`` → ``sync_module_states``): a
  ``mixed`` student or teacher section needs it too, so ``fsdp_config.sync_module_states`` is set (FSDP1 must be
  told; FSDP2 sees the ranks on ``meta`` itself).
* A ``composer_kd_precomputed`` loader gets the run's distillation temperature (the rest mass its batches carry).
"""

from typing import Any

from composer_kd.config.model_schema import init_device

__all__ = ['MODEL_NAME', 'composer_kd_transform']

MODEL_NAME = 'composer_kd_distillation'
PRECOMPUTED_LOADER = 'composer_kd_precomputed'


def composer_kd_transform(cfg: dict[str, Any]) -> dict[str, Any]:
    """The transform (see the module); ``cfg`` is Foundry's whole train config as a dict."""
    model = cfg.get('model') or {}
    if model.get('name') != MODEL_NAME:
        return cfg
    sections = [model.get('student') or {}, model.get('teacher') or {}, *(model.get('teachers') or [])]
    if cfg.get('fsdp_config') is not None and any(init_device(s) == 'mixed' for s in sections if isinstance(s, dict)):
        cfg['fsdp_config'].setdefault('sync_module_states', True)
    temperature = (model.get('distillation') or {}).get('temperature', 1.0)
    for loader in ('train_loader', 'eval_loader'):
        if (cfg.get(loader) or {}).get('name') == PRECOMPUTED_LOADER:
            cfg[loader].setdefault('teacher_temperature', temperature)
    return cfg

"""``composer_kd_distillation``: the ``DistillationModel`` LLM Foundry builds from a ``model:`` block.

```yaml
model:
  name: composer_kd_distillation
  init_device: mixed            # Foundry's: applies to the student and teacher sections that do not set their own
  student: {pretrained_model_name_or_path: meta-llama/Llama-3.2-1B}
  teacher: {pretrained_model_name_or_path: meta-llama/Llama-3.1-8B, torch_dtype: bfloat16}
  distillation: {alpha: 0.5, temperature: 1.0, divergence: forward_kl, fused_head: true}
```

Foundry's ``build_composer_model`` calls ``FoundryDistillationModel(tokenizer=..., **block)`` (less ``name``); the
block is checked by the same schema and rules as ``composer-kd train``'s ``model:`` section and built by the same
code (``builders/models.py``). Around the model Foundry does what it does for its own: it passes every
``model.parameters()`` to the optimizer (the teacher's never get a gradient, so they are never updated and
AdamW keeps no state for them), logs ``n_total_params`` / ``n_active_params`` (the student's and its hidden-state
projections: what is trained), saves ``state.model.model`` — the student — with its ``hf_checkpointer``, calls
``flops_per_batch`` for MFU, and evaluates the student alone on its in-context-learning tasks (their metrics are
added to the eval metrics when Foundry is installed).
"""

from typing import Any, Mapping, Optional

from composer_kd.builders.models import distillation_model_arguments
from composer_kd.config.paths import LocalPaths
from composer_kd.config.run_rules import check_model_rules
from composer_kd.config.run_schema import FOUNDRY_MODEL_BLOCK
from composer_kd.config.schema import check
from composer_kd.errors import ConfigError
from composer_kd.model.distillation_model import DistillationModel

__all__ = ['FoundryDistillationModel', 'model_block']

_SECTIONS = ('student', 'teacher')


def model_block(block: Mapping[str, Any]) -> dict[str, Any]:
    """A Foundry ``model:`` block (less ``name``) checked and as ``composer-kd train`` reads its ``model:`` section:
    a top-level ``init_device`` goes to the student and teacher sections that do not set their own.

    Raises:
        ConfigError: naming the key and the value.
    """
    check(dict(block), FOUNDRY_MODEL_BLOCK, 'model')
    cfg = {k: v for k, v in block.items() if k != 'init_device' and v is not None}
    device = block.get('init_device')
    if device is not None:
        for key in _SECTIONS:
            if isinstance(cfg.get(key), Mapping) and not cfg[key].get('precomputed'):
                cfg[key] = {'init_device': device, **cfg[key]}
        cfg['teachers'] = [{'init_device': device, **t} for t in cfg['teachers']] if cfg.get('teachers') else None
    if (cfg.get('distillation') or {}).get('on_policy') is not None:
        raise ConfigError('model.distillation.on_policy: on-policy distillation needs composer-kd\'s prompt loader and '
                          'rollout callback, which llmfoundry train does not build; run it with composer-kd train')
    check_model_rules({'model': cfg}, LocalPaths())
    return {k: v for k, v in cfg.items() if v is not None}


def _icl_metrics() -> dict[str, Any]:
    """LLM Foundry's in-context-learning metrics, by name (its ICL evaluators pick theirs from the model's eval
    metrics); none without Foundry."""
    try:
        from llmfoundry.metrics import DEFAULT_CAUSAL_LM_EVAL_METRICS
        from llmfoundry.registry import metrics
    except ImportError:
        return {}
    built = [metrics.get(name)() for name in DEFAULT_CAUSAL_LM_EVAL_METRICS]
    # Composer matches an evaluator's metric_names against these keys: the class names, as Foundry's models use.
    return {type(m).__name__: m for m in built if type(m).__name__.startswith('InContextLearning')}


class FoundryDistillationModel(DistillationModel):
    """A ``DistillationModel`` from an LLM Foundry ``model:`` block (see the module).

    Args:
        tokenizer: the run's tokenizer (Foundry passes it).
        student (Mapping): the student section (Foundry's ``hf_causal_lm`` keys, or ``from_teacher``).
        teacher (Mapping, optional): the teacher section, or ``{precomputed: true}``.
        teachers (list[Mapping], optional): an ensemble instead.
        distillation (Mapping, optional): the loss settings (``model.distillation``).
        init_device (str, optional): Foundry's ``cpu`` / ``mixed`` / ``meta`` for every section without its own.
    """

    def __init__(self, tokenizer: Any, student: Mapping[str, Any], teacher: Optional[Mapping[str, Any]] = None,
                 teachers: Optional[list[Mapping[str, Any]]] = None, distillation: Optional[Mapping[str, Any]] = None,
                 init_device: Optional[str] = None) -> None:
        cfg = model_block({'student': student, 'teacher': teacher, 'teachers': teachers,
                           'distillation': distillation, 'init_device': init_device})
        try:
            super().__init__(**distillation_model_arguments(cfg, tokenizer))
        except ValueError as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f'model: {e}') from e
        self.val_metrics.update(_icl_metrics())

    @property
    def n_total_params(self) -> int:
        """What is trained: the student's parameters (and any hidden-state projections), not the teacher's."""
        trained = [self.model] + ([self.hidden_states] if self.hidden_states is not None else [])
        return sum(p.numel() for module in trained for p in module.parameters())

    @property
    def n_active_params(self) -> int:
        return self.n_total_params

"""Builds the tokenizer, the student, the teacher and the ``DistillationModel`` from the YAML ``model:`` and
``tokenizer:`` sections (already checked by ``config/``). A folder or Hub id that cannot be read as a model or
tokenizer (``OSError``, Hugging Face's ``ValueError``) is a ``ConfigError`` naming its key; anything else keeps its
traceback."""

import os
from typing import Any, Mapping, Optional

import torch
from composer.utils import dist
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.modeling_utils import init_empty_weights

from composer_kd.config.model_schema import HF_MODEL_SECTION, attention, check_model_section, hub_kwargs, \
    init_device, loads_weights
from composer_kd.config.paths import LocalPaths
from composer_kd.config.run_rules import ensemble_weights, has_teacher, model_entries, teacher_entries
from composer_kd.config.schema import check
from composer_kd.errors import ConfigError
from composer_kd.model.distillation_model import DistillationModel
from composer_kd.model.hidden_state_taps import HiddenStateDistillation
from composer_kd.model.layer_pruning import cut_model, empty_cut_model, family_of, select_layers
from composer_kd.model.vocab import check_same_vocabulary

__all__ = ['build_tokenizer', 'build_causal_lm', 'build_distillation_model', 'build_student_from_teacher',
           'check_model_tokenizer', 'distillation_model_arguments', 'model_tokenizer']

_TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'vocab.json', 'tokenizer.model')


def _without(section: Mapping[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: v for k, v in section.items() if k not in keys}


def _check_source(key: str, name: str) -> str:
    LocalPaths().folder(key, name)
    return os.path.expanduser(name)


def build_tokenizer(cfg: Mapping[str, Any]) -> PreTrainedTokenizerBase:
    """``tokenizer: {name: PATH_OR_ID, kwargs: {...}}`` → a Hugging Face tokenizer."""
    name = _check_source('tokenizer.name', cfg['name'])
    try:
        return AutoTokenizer.from_pretrained(name, **(cfg.get('kwargs') or {}))
    except (OSError, ValueError) as e:  # not a tokenizer folder, or Hugging Face cannot read it
        raise ConfigError(f'tokenizer.name: cannot load a tokenizer from {name!r}: {str(e).splitlines()[0]}') from e


def _dtype(value: Optional[str]) -> Optional[torch.dtype]:
    if value is None or value == 'auto':
        return value  # type: ignore[return-value]
    return getattr(torch, str(value))  # checked by check_model_section


def _is_main_rank() -> bool:
    return dist.get_global_rank() == 0


def build_causal_lm(key: str, cfg: Mapping[str, Any]) -> PreTrainedModel:
    """Loads ``pretrained_model_name_or_path`` or builds a fresh model from ``config`` (a dict with ``model_type``)
    or from the saved config alone (``pretrained: false``); ``config_overrides`` patch either config.

    ``init_device`` (LLM Foundry's): ``cpu`` loads on every rank; ``mixed`` loads on rank 0 only and builds empty
    (``meta``) weights elsewhere, which FSDP fills from rank 0 when it shards the model; ``meta`` builds empty weights
    everywhere, initialised once sharded (a fresh model only).

    Args:
        key (str): the config path of this section, for messages (``model.student``).
        cfg (Mapping): the section (a library caller's is checked here as a YAML's would be).
    """
    check(_without(cfg, ('weight', 'precomputed')), HF_MODEL_SECTION, key)
    check_model_section(key, cfg)
    source, config_dict = cfg.get('pretrained_model_name_or_path'), cfg.get('config')
    kwargs: dict[str, Any] = {'trust_remote_code': bool(cfg.get('trust_remote_code', False))}
    if attention(cfg) is not None:
        kwargs['attn_implementation'] = attention(cfg)
    overrides = dict(cfg.get('config_overrides') or {})
    hub = hub_kwargs(cfg)
    device = init_device(cfg)
    empty = device == 'meta' or (device == 'mixed' and not _is_main_rank())
    dtype = _dtype(cfg.get('torch_dtype'))
    try:
        if source is not None:
            source = _check_source(f'{key}.pretrained_model_name_or_path', source)
            config = AutoConfig.from_pretrained(source, trust_remote_code=kwargs['trust_remote_code'], **hub,
                                                **overrides)
        else:
            fields = dict(config_dict)
            config = AutoConfig.for_model(fields.pop('model_type'), **fields, **overrides)
        if empty:  # parameters on meta, buffers (rotary tables) real: FSDP's init or broadcast fills the weights
            with init_empty_weights(include_buffers=False):
                model = AutoModelForCausalLM.from_config(config, torch_dtype=dtype, **kwargs)
            model.tie_weights()  # Hugging Face's tying does not take on meta (LLM Foundry ties again too)
        elif loads_weights(cfg):
            model = AutoModelForCausalLM.from_pretrained(source, config=config, torch_dtype=dtype, **hub, **kwargs)
        else:
            model = AutoModelForCausalLM.from_config(config, torch_dtype=dtype, **kwargs)
    except ConfigError:
        raise
    except (OSError, ValueError) as e:  # a folder or config Hugging Face cannot read as this model
        raise ConfigError(f'{key}: cannot build the model: {str(e).splitlines()[0]}') from e
    return model


def model_tokenizer(source: str, cfg: Mapping[str, Any]) -> Optional[PreTrainedTokenizerBase]:
    """The tokenizer a model folder or Hub repository ships, or ``None`` when it ships none."""
    if os.path.isdir(os.path.expanduser(source)):
        if not any(os.path.isfile(os.path.join(os.path.expanduser(source), f)) for f in _TOKENIZER_FILES):
            return None
        return AutoTokenizer.from_pretrained(os.path.expanduser(source))
    try:  # a Hub id: its tokenizer, from the cache or the Hub (a repository without one raises OSError)
        return AutoTokenizer.from_pretrained(source, trust_remote_code=bool(cfg.get('trust_remote_code', False)),
                                             **hub_kwargs(cfg))
    except (OSError, ValueError):
        return None


def check_model_tokenizer(key: str, cfg: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase) -> None:
    """Refuses a model (folder or Hub id) whose tokenizer maps any token to another id than the run's."""
    source = cfg.get('pretrained_model_name_or_path')
    own = model_tokenizer(source, cfg) if source is not None else None
    if own is not None:
        try:
            check_same_vocabulary(tokenizer, own, key)
        except ValueError as e:
            raise ConfigError(f'{key}: {e}') from e


def build_distillation_model(cfg: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase) -> DistillationModel:
    """The YAML ``model:`` section → ``DistillationModel`` (student, optional teacher or ``teachers`` ensemble,
    loss settings); a precomputed teacher (``teacher: {precomputed: true}``) loads no teacher model."""
    arguments = distillation_model_arguments(cfg, tokenizer)
    try:
        return DistillationModel(**arguments)
    except ValueError as e:
        raise ConfigError(f'model: {e}') from e


def distillation_model_arguments(cfg: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """The ``DistillationModel`` keyword arguments of a ``model:`` section, its models built (``composer-kd train``
    and LLM Foundry's ``composer_kd_distillation`` model share it)."""
    distillation = dict(cfg.get('distillation') or {})
    distillation.pop('on_policy', None)  # a callback's settings (callbacks/on_policy.py), not the loss's
    precomputed = bool((cfg.get('teacher') or {}).get('precomputed'))
    if not has_teacher(cfg):
        distillation.setdefault('alpha', 1.0)
    hidden_states = distillation.pop('hidden_states', None)
    weights = ensemble_weights(cfg)
    teachers = teacher_entries(cfg)
    for key, section in model_entries(cfg):  # cheap, so before the models load
        check_model_tokenizer(key, section, tokenizer)
    cut = cfg['student'].get('from_teacher')
    if cut is None:
        student = build_causal_lm('model.student', cfg['student'])
        models = [build_causal_lm(key, section) for key, section in teachers]
    else:  # the teacher first: the student is made from it
        models = [build_causal_lm(key, section) for key, section in teachers]
        student = build_student_from_teacher(cfg['student'], models[0] if models else None, tokenizer)
    try:
        taps = HiddenStateDistillation(student, models[0], **hidden_states) if hidden_states is not None else None
    except ValueError as e:
        raise ConfigError(f'model.distillation.hidden_states: {e}') from e
    return {'student': student, 'teacher': models or None, 'tokenizer': tokenizer,
            'teacher_weights': weights if models else None, 'precomputed_teacher': precomputed, 'hidden_states': taps,
            **distillation}


def build_student_from_teacher(section: Mapping[str, Any], teacher: Optional[PreTrainedModel],
                               tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """``model.student: {from_teacher: ...}`` → the student cut from ``teacher`` (the run's) or from the checkpoint
    ``from_teacher.pretrained_model_name_or_path`` (``model/layer_pruning.py``), in ``torch_dtype`` (default float32).

    A rank that holds no weights of the source (``init_device: mixed`` on ranks > 0, the teacher's or the student's)
    builds the cut student on ``meta`` from the cut config; FSDP gives it rank 0's weights.
    """
    cut = section['from_teacher']
    key = 'model.student.from_teacher'
    if cut.get('pretrained_model_name_or_path') is not None:
        check_model_tokenizer(key, cut, tokenizer)
        teacher = build_causal_lm(key, {'pretrained_model_name_or_path': cut['pretrained_model_name_or_path'],
                                        'init_device': init_device(section)})
    assert teacher is not None, 'config/run_rules.py refuses from_teacher without a model to cut'
    try:
        family = family_of(teacher.config)
    except ValueError as e:
        raise ConfigError(f'{key}: {e}') from e
    name = 'layers' if cut.get('layers') is not None else 'every'
    try:
        layers = select_layers(getattr(teacher.config, family.depth), cut.get('layers'), cut.get('every'),
                               bool(cut.get('keep_first')), bool(cut.get('keep_last')))
    except ValueError as e:
        raise ConfigError(f'{key}.{name}={cut[name]!r}: {e}') from e
    dtype = _dtype(section.get('torch_dtype')) or torch.float32
    if dtype == 'auto':
        dtype = teacher.dtype
    empty = any(p.is_meta for p in teacher.parameters()) or (init_device(section) == 'mixed' and not _is_main_rank())
    build = empty_cut_model if empty else cut_model
    return build(teacher.config if empty else teacher, layers, dtype, attention(section))


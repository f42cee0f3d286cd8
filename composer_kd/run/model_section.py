"""A model section (``model.student``, ``model.teacher``, ``model.teachers.N``) in LLM Foundry's ``hf_causal_lm``
terms: which keys it takes, what each means, and the ``from_pretrained`` arguments they become.

Foundry's model block ports as written (``name``, ``pretrained_model_name_or_path``, ``pretrained``,
``init_device``, ``config_overrides``, ``use_flash_attention_2``, ``revision``, ``trust_remote_code``,
``use_auth_token``); ours adds ``config`` (a from-scratch model from a dict), ``torch_dtype`` and
``attn_implementation``. Foundry keys that cannot mean here what they mean there are refused by name with the
reason. One difference on purpose: ``trust_remote_code`` is off unless the YAML sets it (Foundry's default is on).
"""

import os
from typing import Any, Mapping

from composer_kd.errors import ConfigError

__all__ = ['MODEL_KEYS', 'INIT_DEVICES', 'REFUSED', 'attention', 'check_model_section', 'fsdp_settings', 'hub_kwargs',
           'init_device', 'loads_weights']

INIT_DEVICES = ('cpu', 'meta', 'mixed')
_DTYPES = ('auto', 'float32', 'float16', 'bfloat16', 'float64')
_ATTENTION = ('eager', 'sdpa', 'flash_attention_2', 'flash_attention_3', 'flex_attention')

_METRICS = 'the metrics are fixed: CE, perplexity, teacher divergence and top-1 agreement'
# Foundry hf_causal_lm keys we cannot honour: (the values that mean what we do anyway, why any other is refused).
REFUSED: dict[str, tuple[tuple[Any, ...], str]] = {
    'peft_config': ((None,), 'LoRA/PEFT students are not supported: the student trains all its weights'),
    'pretrained_lora_id_or_path': ((None,), 'LoRA/PEFT adapters are not supported: merge the adapter first'),
    'should_save_peft_only': ((None, True), 'LoRA/PEFT students are not supported'),
    'load_in_8bit': ((None, False), '8-bit weights can neither be trained nor sharded by FSDP here; use '
                     'torch_dtype: bfloat16'),
    'use_logits': ((None, True), 'the distillation loss always reads the logits'),
    'shift_labels': ((None, True), 'labels are always shifted (causal language models only)'),
    'allow_embedding_resizing': ((None, False), 'the embeddings must already match the tokenizer'),
    'use_train_metrics': ((None, True), _METRICS),
    'additional_train_metrics': ((None, []), _METRICS),
    'additional_eval_metrics': ((None, []), _METRICS),
}
MODEL_KEYS = frozenset({
    'name', 'pretrained_model_name_or_path', 'pretrained', 'config', 'config_overrides', 'init_device', 'torch_dtype',
    'attn_implementation', 'use_flash_attention_2', 'revision', 'trust_remote_code', 'use_auth_token', 'token',
    *REFUSED
})


def _expect(ok: bool, key: str, value: Any, what: str) -> None:
    if not ok:
        raise ConfigError(f'{key} must be {what}, got {value!r}')


def check_model_section(key: str, section: Mapping[str, Any]) -> None:
    """Every value of one model section, naming the key; nothing is loaded.

    Args:
        key (str): the section's config path (``model.student``), for messages.
        section (Mapping): the section.
    """
    for name, (same, reason) in REFUSED.items():
        if name in section and not any(section[name] == v and type(section[name]) is type(v) for v in same):
            raise ConfigError(f'{key}.{name}={section[name]!r} is not supported: {reason}')
    if section.get('name') is not None:
        _expect(section['name'] == 'hf_causal_lm', f'{key}.name', section['name'],
                "'hf_causal_lm' (Hugging Face causal language models) or left out")
    source, config = section.get('pretrained_model_name_or_path'), section.get('config')
    if (source is None) == (config is None):
        raise ConfigError(f'{key}: give exactly one of pretrained_model_name_or_path (a saved model) or config '
                          '(a from-scratch model)')
    if config is not None and (not isinstance(config, Mapping) or 'model_type' not in config):
        raise ConfigError(f'{key}.config must be a mapping with a model_type, got {config!r}')
    for flag in ('pretrained', 'trust_remote_code', 'use_flash_attention_2'):
        if section.get(flag) is not None:
            _expect(isinstance(section[flag], bool), f'{key}.{flag}', section[flag], 'true or false')
    if config is not None and section.get('pretrained') is True:
        raise ConfigError(f'{key}.pretrained: true needs pretrained_model_name_or_path (config builds a fresh model)')
    if section.get('config_overrides') is not None:
        _expect(isinstance(section['config_overrides'], Mapping), f'{key}.config_overrides',
                section['config_overrides'], 'a mapping of config fields')
    if section.get('torch_dtype') is not None:
        _expect(section['torch_dtype'] in _DTYPES, f'{key}.torch_dtype', section['torch_dtype'],
                f'one of {list(_DTYPES)}')
    attention = section.get('attn_implementation')
    if attention is not None:
        _expect(attention in _ATTENTION, f'{key}.attn_implementation', attention, f'one of {list(_ATTENTION)}')
        if section.get('use_flash_attention_2') and attention != 'flash_attention_2':
            raise ConfigError(f'{key}: use_flash_attention_2: true and attn_implementation: {attention} disagree; '
                              'give one of them')
    if section.get('revision') is not None:
        _expect(isinstance(section['revision'], str) and section['revision'] != '', f'{key}.revision',
                section['revision'], 'a branch, tag or commit of the model repository')
    for token in ('use_auth_token', 'token'):
        if section.get(token) is not None:
            _expect(isinstance(section[token], (bool, str)) and section[token] != '', f'{key}.{token}',
                    section[token], 'true (the HF_TOKEN of the environment), false or a token')
    if section.get('use_auth_token') is not None and section.get('token') is not None:
        raise ConfigError(f'{key}: give token or use_auth_token (its old name), not both')
    device = section.get('init_device', 'cpu')
    _expect(device in INIT_DEVICES, f'{key}.init_device', device, f'one of {list(INIT_DEVICES)}')
    if device == 'meta' and loads_weights(section):
        raise ConfigError(f'{key}.init_device: meta builds empty weights, so it needs pretrained: false (or config); '
                          'init_device: mixed loads pretrained weights on rank 0 only')


def loads_weights(section: Mapping[str, Any]) -> bool:
    """Whether the section loads saved weights (else it builds a fresh model from a config)."""
    return section.get('pretrained_model_name_or_path') is not None and section.get('pretrained', True) is not False


def init_device(section: Mapping[str, Any]) -> str:
    """``cpu`` (every rank loads), ``meta`` (empty weights, initialised once sharded) or ``mixed`` (rank 0 loads,
    the others build on ``meta`` and receive rank 0's weights from FSDP)."""
    return section.get('init_device', 'cpu')


def hub_kwargs(section: Mapping[str, Any]) -> dict[str, Any]:
    """The Hub arguments of ``from_pretrained`` (config, model and tokenizer): ``revision`` and ``token``
    (``use_auth_token: true`` is ``token: true``, the environment's ``HF_TOKEN``)."""
    kwargs: dict[str, Any] = {}
    if section.get('revision') is not None:
        kwargs['revision'] = section['revision']
    token = section.get('token', section.get('use_auth_token'))
    if token is not None and token is not False:
        kwargs['token'] = token
    return kwargs


def attention(section: Mapping[str, Any]) -> str | None:
    """``attn_implementation``, with Foundry's ``use_flash_attention_2: true`` as ``flash_attention_2``."""
    if section.get('use_flash_attention_2'):
        return 'flash_attention_2'
    return section.get('attn_implementation')


def fsdp_settings(fsdp_config: Mapping[str, Any], sections: list[Mapping[str, Any]]) -> dict[str, Any]:
    """Composer's ``parallelism_config['fsdp']`` for models built from ``sections``: ``init_device: mixed`` needs
    ``sync_module_states`` (FSDP1 must be told; FSDP2 turns it on itself when it sees ranks on ``meta``)."""
    fsdp = dict(fsdp_config)
    if any(init_device(section) == 'mixed' for section in sections) and os.environ.get('FSDP_VERSION') != '2':
        fsdp.setdefault('sync_module_states', True)
    return fsdp

"""A model section (``model.student``, ``model.teacher``, ``model.teachers.N``) in LLM Foundry's ``hf_causal_lm``
terms, and ``model.distillation``: their keys, what each means, the rules between them, and the
``from_pretrained`` arguments they become.

Foundry's model block ports as written (``name``, ``pretrained_model_name_or_path``, ``pretrained``,
``init_device``, ``config_overrides``, ``use_flash_attention_2``, ``revision``, ``trust_remote_code``,
``use_auth_token``); ours adds ``config`` (a from-scratch model from a dict), ``torch_dtype`` and
``attn_implementation``. Foundry keys that cannot mean here what they mean there are refused by name with the
reason. One difference on purpose: ``trust_remote_code`` is off unless the YAML sets it (Foundry's default is on).
"""

import os
from typing import Any, Mapping

from composer_kd.config.kinds import AnyOf, Anything, Bool, Choice, Integer, ListOf, Number, Text
from composer_kd.config.schema import MODEL, Free, Key, Section
from composer_kd.errors import ConfigError
from composer_kd.losses.settings import DIVERGENCE_ARGUMENTS, ENSEMBLE_MODES

__all__ = [
    'DISTILLATION', 'FROM_TEACHER', 'HF_MODEL_SECTION', 'HIDDEN_STATES', 'HIDDEN_STATE_LOSSES', 'INIT_DEVICES',
    'MODEL_KEYS', 'REFUSED', 'attention', 'check_model_section', 'fsdp_settings', 'hub_kwargs', 'init_device',
    'loads_weights', 'model_section'
]

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


_TOKEN = AnyOf(Bool(), Text(), what='true (the HF_TOKEN of the environment), false or a token')
_HF_KEYS = (
    Key('name', Choice(['hf_causal_lm'], what="'hf_causal_lm' (Hugging Face causal language models) or left out"),
        'LLM Foundry\'s model name; only Hugging Face causal LMs.', dest=MODEL),
    Key('pretrained_model_name_or_path', Text(what='a folder or a Hugging Face model id'),
        'A saved model: a local folder or a Hub id (give this or `config`).', dest=MODEL),
    Key('pretrained', Bool(), '`false`: a fresh model from the saved config (Foundry\'s meaning).', True, MODEL),
    Free('config', 'A fresh model from a config dict with a `model_type` (give this or '
         '`pretrained_model_name_or_path`).', MODEL),
    Free('config_overrides', 'Fields set on the model\'s config before it is built.', MODEL),
    Key('init_device', Choice(INIT_DEVICES), '`cpu`: every rank loads; `mixed`: rank 0 loads, FSDP gives the other '
        'ranks their shards; `meta`: empty weights, initialised once sharded (fresh models, GPU).', 'cpu', MODEL),
    Key('torch_dtype', Choice(_DTYPES), 'The weights\' dtype (a frozen teacher needs no fp32 master weights).',
        dest=MODEL),
    Key('attn_implementation', Choice(_ATTENTION), 'Hugging Face\'s attention implementation.', dest=MODEL),
    Key('use_flash_attention_2', Bool(), 'Foundry\'s spelling of `attn_implementation: flash_attention_2`.',
        dest=MODEL),
    Key('revision', Text(what='a branch, tag or commit of the model repository'), 'A Hub revision.', dest=MODEL),
    Key('trust_remote_code', Bool(), 'Run a Hub model\'s own code (off unless set: Foundry\'s default is on).', False,
        MODEL),
    Key('use_auth_token', _TOKEN, 'Foundry\'s old name of `token`.', dest=MODEL),
    Key('token', _TOKEN, 'A Hub token (`true`: the environment\'s HF_TOKEN).', dest=MODEL),
    *(Key(name, Anything(), f'Refused unless {" or ".join(repr(v) for v in same)}: {reason}.', dest=MODEL)
      for name, (same, reason) in REFUSED.items()),
)
MODEL_KEYS = frozenset(entry.name for entry in _HF_KEYS)


def model_section(name: str, help: str, *extra: Any, required: bool = False) -> Section:
    """A section of ``hf_causal_lm`` keys (and ``extra`` entries)."""
    return Section(name, help, (*_HF_KEYS, *extra), required=required, dest=MODEL)


HF_MODEL_SECTION = model_section('model', 'A Hugging Face causal LM (LLM Foundry\'s hf_causal_lm block).')


# A student cut from the teacher (model/layer_pruning.py); docs/pruned-students.md.
FROM_TEACHER = Section('from_teacher', 'Cut the student from the teacher: the teacher\'s architecture with only some of '
                       'its blocks, their weights copied (a Llama, Mistral, Qwen2, Qwen3 or GPT-2 model).', (
    Key('layers', ListOf(Integer(0), what='a list of block indices'), 'The teacher blocks to keep, increasing (give '
        'this or `every`).', dest=MODEL),
    Key('every', Integer(1), 'Keep every k-th block: k−1, 2k−1, … (give this or `layers`).', dest=MODEL),
    Key('keep_first', Bool(), 'With `every`: also keep block 0.', False, MODEL),
    Key('keep_last', Bool(), 'With `every`: also keep the last block.', False, MODEL),
    Key('pretrained_model_name_or_path', Text(what='a folder or a Hugging Face model id'), 'Cut this checkpoint '
        'instead of the run\'s teacher (needed with an ensemble).', dest=MODEL),
), dest=MODEL)
# The keys a from_teacher student may have besides: what the cut model is built with, not what it is.
_FROM_TEACHER_WITH = ('from_teacher', 'name', 'init_device', 'torch_dtype', 'attn_implementation',
                      'use_flash_attention_2')


# composer_kd.losses.hidden_states.HIDDEN_STATE_LOSSES (tests/test_hidden_states.py checks they agree).
HIDDEN_STATE_LOSSES = ('cosine', 'mse', 'normalized_mse')
HIDDEN_STATES = Section('hidden_states', 'Also distil intermediate hidden states: `weight` times their distance is '
                        'added to the loss, logged as loss/train/hidden (docs/pruned-students.md).', (
    Key('pairs', AnyOf(Choice(['uniform']), ListOf(ListOf(Integer(0), length=2)),
                       what="'uniform' or a list of [student_block, teacher_block] pairs"),
        '`uniform`: student block i with teacher block round((i+1)·L_t/L_s)−1 (a student cut from the teacher: the '
        'blocks it kept); or explicit pairs.', 'uniform', MODEL),
    Key('loss', Choice(HIDDEN_STATE_LOSSES), 'Per scored token: `cosine` (1 − cos), `mse` (mean over features) or '
        '`normalized_mse` (squared error over the teacher state\'s squared norm).', 'cosine', MODEL),
    Key('weight', Number(0, low_open=True), 'The term\'s weight in the total loss.', 1.0, MODEL),
    Key('projection', Choice(['auto', 'linear', 'none']), '`auto`: a trainable bias-free Linear per pair when the '
        'widths differ (none when equal); `linear`: always; `none`: the widths must be equal.', 'auto', MODEL),
), dest=MODEL)

_BETA = DIVERGENCE_ARGUMENTS['jsd']['beta']
_LAM = DIVERGENCE_ARGUMENTS['skew_kl']['lam']
DISTILLATION = Section('distillation', 'The loss: `alpha·CE + (1 − alpha)·T²·D(teacher‖student)`.', (
    Key('alpha', Number(0, 1), 'Weight of cross-entropy on the labels (1 without a teacher).', 0.5, MODEL),
    Key('temperature', Number(0, low_open=True), 'Softmax temperature T of both distributions in D.', 1.0, MODEL),
    Key('divergence', Choice(sorted(DIVERGENCE_ARGUMENTS)), 'D.', 'forward_kl', MODEL),
    Key('beta', Number(_BETA[1], _BETA[2], what=f'a number in [{_BETA[1]}, {_BETA[2]}]'), '`jsd`: the teacher\'s '
        'weight in the mixture.', _BETA[0], MODEL),
    Key('lam', Number(_LAM[1], _LAM[2], what=f'a number in [{_LAM[1]}, {_LAM[2]}]'), '`skew_kl` / '
        '`skew_reverse_kl`: the skew.', _LAM[0], MODEL),
    Key('ensemble', Choice(ENSEMBLE_MODES), 'With `model.teachers`: mix their tempered distributions (`probs`) or '
        'average their logits (`logits`).', 'probs', MODEL, refusal='{path}={value!r}: use {what}'),
    Key('fused_head', AnyOf(Bool(), Choice(['liger']), what='true, false or liger'), 'Apply the LM heads inside the '
        'loss, chunk by chunk: no (B, T, V) logits at all (`liger`: Liger-Kernel\'s where it computes the same).',
        False, MODEL),
    HIDDEN_STATES,
    Section('on_policy', 'On-policy distillation (GKD): the student samples continuations of the prompts '
            '(`train_loader.name: prompts`) and the teacher grades every sampled token.', (
                Key('fraction', Number(0, 1), 'Share of steps on the student\'s own samples (GKD\'s lambda); the '
                    'same draw on every process.', 1.0, MODEL),
                Key('source_of_rest', Choice(['dataset', 'teacher']), 'The other steps\' continuations: the '
                    'dataset\'s responses (supervised KD) or the teacher\'s samples (sequence-level KD).', 'dataset',
                    MODEL),
                Key('max_new_tokens', Integer(1), 'The generation budget; a longer continuation is cut there '
                    '(counted as truncated).', 256, MODEL),
                Key('temperature', Number(0, low_open=True), 'Sampling temperature; must equal '
                    '`model.distillation.temperature` unless `allow_temperature_mismatch`.', None, MODEL),
                Key('allow_temperature_mismatch', Bool(), 'Sample at another temperature than the loss\'s (the '
                    'mismatch is logged).', False, MODEL),
                Key('top_k', Integer(0), 'Sample among the k most likely tokens only (0: all); the loss stays over '
                    'the full distribution, so this is a warned choice.', 0, MODEL),
                Key('top_p', Number(0, 1, low_open=True), 'Nucleus sampling (1: all); warned, as top_k.', 1.0, MODEL),
                Key('generate_batch_size', Integer(1), 'Prompts per generate call (default: the device batch).',
                    dest=MODEL),
                Key('eos_token_ids', AnyOf(Integer(0), ListOf(Integer(0)), what='a token id or a list of them'),
                    'Ids that end a continuation (default: the tokenizer\'s EOS and the student\'s generation '
                    'config\'s).', dest=MODEL),
                Key('sample_log', Text(what='a folder'), 'Each process appends its steps\' continuations there as '
                    'JSON lines (step, sample id, policy, token ids).', dest=MODEL),
            ), dest=MODEL),
), dest=MODEL)


def check_model_section(key: str, section: Mapping[str, Any]) -> None:
    """The rules between one model section's keys (each value's kind is the schema's), naming the key.

    Args:
        key (str): the section's config path (``model.student``), for messages.
        section (Mapping): the section.
    """
    for name, (same, reason) in REFUSED.items():
        if name in section and not any(section[name] == v and type(section[name]) is type(v) for v in same):
            raise ConfigError(f'{key}.{name}={section[name]!r} is not supported: {reason}')
    source, config = section.get('pretrained_model_name_or_path'), section.get('config')
    if section.get('from_teacher') is not None:
        _check_from_teacher(key, section)
    elif (source is None) == (config is None):
        raise ConfigError(f'{key}: give exactly one of pretrained_model_name_or_path (a saved model) or config '
                          '(a from-scratch model)')
    if config is not None and (not isinstance(config, Mapping) or 'model_type' not in config):
        raise ConfigError(f'{key}.config must be a mapping with a model_type, got {config!r}')
    if config is not None and section.get('pretrained') is True:
        raise ConfigError(f'{key}.pretrained: true needs pretrained_model_name_or_path (config builds a fresh model)')
    attention_key = section.get('attn_implementation')
    if attention_key is not None and section.get('use_flash_attention_2') and attention_key != 'flash_attention_2':
        raise ConfigError(f'{key}: use_flash_attention_2: true and attn_implementation: {attention_key} disagree; '
                          'give one of them')
    if section.get('use_auth_token') is not None and section.get('token') is not None:
        raise ConfigError(f'{key}: give token or use_auth_token (its old name), not both')
    if init_device(section) == 'meta' and loads_weights(section):
        raise ConfigError(f'{key}.init_device: meta builds empty weights, so it needs pretrained: false (or config); '
                          'init_device: mixed loads pretrained weights on rank 0 only')


def _check_from_teacher(key: str, section: Mapping[str, Any]) -> None:
    """A student cut from the teacher takes its architecture and weights from it: nothing else may say what it is;
    the blocks are given once (range: at build time, when the teacher's depth is known)."""
    others = [name for name, value in section.items() if value is not None and name not in _FROM_TEACHER_WITH]
    if others:
        raise ConfigError(f'{key}.{others[0]}: a student cut from the teacher (from_teacher) takes its architecture '
                          f'and weights from it; besides from_teacher give only {list(_FROM_TEACHER_WITH[2:])}')
    cut, where = section['from_teacher'], f'{key}.from_teacher'
    layers = cut.get('layers')
    if (layers is None) == (cut.get('every') is None):
        raise ConfigError(f'{where}: give layers (the blocks to keep) or every (every k-th block), not both or neither')
    if layers is not None and (cut.get('keep_first') or cut.get('keep_last')):
        raise ConfigError(f'{where}: keep_first / keep_last go with every; list the blocks in layers instead')
    if layers is not None and (not layers or any(b <= a for a, b in zip(layers, layers[1:]))):
        raise ConfigError(f'{where}.layers={layers!r} must be a non-empty increasing list without repeats')
    if init_device(section) == 'meta':
        raise ConfigError(f'{key}.init_device: meta builds empty weights; a student cut from the teacher copies its '
                          'weights (init_device: mixed cuts on rank 0 only)')


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

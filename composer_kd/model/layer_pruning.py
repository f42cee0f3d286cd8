"""Depth pruning: a student made from a model (the teacher) by keeping some of its transformer blocks.

The student is the source's architecture with only the kept blocks: its config is the source's with the depth and
every layer-indexed setting rewritten, and it holds copies of the source's embeddings, the kept blocks (renumbered
0, 1, ...), the final norm and the head (tied embeddings stay tied). It is a plain Hugging Face model, saved and
loaded as any other. The config also records what it was cut from (``composer_kd_pruning``: the kept blocks and the
source's depth), which hidden-state distillation uses to pair each block with the block it was copied from.

Only the families whose blocks are known to be position-free are accepted (``FAMILIES``, by model class): a block
must compute the same function at any index. Others are refused by name.

Width pruning (heads, MLP channels, the hidden size, ranked by activation statistics as Minitron does) fits beside
this: a ``Family`` says where the blocks and the per-layer settings are; a width step would add where each block's
projections are, rewrite the config's widths and slice the copied weights in ``cut_state_dict``'s place.
"""

import copy
import dataclasses
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.modeling_utils import init_empty_weights
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

__all__ = ['FAMILIES', 'Family', 'cut_config', 'cut_model', 'cut_state_dict', 'empty_cut_model', 'family_of',
           'select_layers']


@dataclasses.dataclass(frozen=True)
class Family:
    """Where a model family keeps what depth pruning rewrites.

    Attributes:
        blocks (str): the state-dict prefix of the blocks' ``ModuleList`` (``model.layers``).
        depth (str): the config field of the number of blocks.
        per_layer (tuple[str, ...]): config fields holding one entry per block (kept entries are kept).
        counts (tuple[str, ...]): config fields counting the first blocks of a kind (``max_window_layers``: the first
            n blocks use full attention); rewritten to the number of kept blocks below the old count.
        refusal (Callable, optional): config -> why this model cannot be cut, or None.
    """
    blocks: str
    depth: str
    per_layer: tuple[str, ...] = ()
    counts: tuple[str, ...] = ()
    refusal: Optional[Callable[[PretrainedConfig], Optional[str]]] = None


def _gpt2_refusal(config: PretrainedConfig) -> Optional[str]:
    if getattr(config, 'scale_attn_by_inverse_layer_idx', False):
        return ('scale_attn_by_inverse_layer_idx is on: its blocks scale attention by 1/(index + 1), so a block moved '
                'to another index computes something else')
    return None


_QWEN = Family('model.layers', 'num_hidden_layers', per_layer=('layer_types',), counts=('max_window_layers',))
# transformers 4.53's causal LMs whose blocks compute the same at any index (the index only picks a KV-cache slot).
FAMILIES: dict[str, Family] = {
    'LlamaForCausalLM': Family('model.layers', 'num_hidden_layers'),
    'MistralForCausalLM': Family('model.layers', 'num_hidden_layers'),
    'Qwen2ForCausalLM': _QWEN,
    'Qwen3ForCausalLM': _QWEN,
    'GPT2LMHeadModel': Family('transformer.h', 'n_layer', refusal=_gpt2_refusal),
}


def _class_name(config: PretrainedConfig) -> str:
    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type, f'{config.model_type!r} models')


def family_of(config: PretrainedConfig) -> Family:
    """The ``Family`` of the causal LM a config builds.

    Raises:
        ValueError: naming the model class when it is not supported, or why this one cannot be cut.
    """
    name = _class_name(config)
    family = FAMILIES.get(name)
    if family is None:
        raise ValueError(f'{name} cannot be cut (supported: {", ".join(sorted(FAMILIES))})')
    reason = family.refusal(config) if family.refusal is not None else None
    if reason is not None:
        raise ValueError(f'this {name} cannot be cut: {reason}')
    return family


def select_layers(depth: int, layers: Optional[Sequence[int]] = None, every: Optional[int] = None,
                  keep_first: bool = False, keep_last: bool = False) -> list[int]:
    """The blocks to keep of a model of ``depth`` blocks: ``layers`` as given, or every ``every``-th block.

    ``every: k`` keeps blocks k−1, 2k−1, … — the last of each run of k, the block a uniform pairing
    (``hidden_state_taps.uniform_pairs``) maps a student block to — and ``keep_first`` / ``keep_last`` add block 0 /
    block depth−1 (the blocks depth pruning studies find hardest to remove).

    Raises:
        ValueError: for both or neither of ``layers`` and ``every``, blocks out of range, repeated or unordered
            blocks, or ``keep_*`` without ``every``.
    """
    if (layers is None) == (every is None):
        raise ValueError('give layers (the blocks to keep) or every (keep every k-th block), not both or neither')
    if layers is not None:
        kept = [int(i) for i in layers]
        if keep_first or keep_last:
            raise ValueError('keep_first / keep_last go with every; list the blocks in layers instead')
        if not kept:
            raise ValueError('layers is empty: keep at least one block')
        out = [i for i in kept if not 0 <= i < depth]
        if out:
            raise ValueError(f'layers {out} out of range: the model has {depth} blocks (0-{depth - 1})')
        if any(b <= a for a, b in zip(kept, kept[1:])):
            raise ValueError(f'layers must be increasing without repeats, got {kept}')
        return kept
    assert every is not None
    if not 1 <= every <= depth:
        raise ValueError(f'every must be between 1 and the model\'s {depth} blocks, got {every}')
    kept_set = {i for i in range(depth) if (i + 1) % every == 0}
    kept_set |= {0} if keep_first else set()
    kept_set |= {depth - 1} if keep_last else set()
    return sorted(kept_set)


def cut_config(config: PretrainedConfig, layers: Sequence[int]) -> PretrainedConfig:
    """A copy of ``config`` for the blocks ``layers`` (checked by ``select_layers``): the depth and the layer-indexed
    settings rewritten, and ``composer_kd_pruning`` recording the kept blocks and the source's depth."""
    family = family_of(config)
    depth = getattr(config, family.depth)
    new = copy.deepcopy(config)
    setattr(new, family.depth, len(layers))
    for field in family.per_layer:
        values = getattr(config, field, None)
        if values is not None:
            if len(values) != depth:
                raise ValueError(f'{field} has {len(values)} entries for {depth} blocks')
            setattr(new, field, [values[i] for i in layers])
    for field in family.counts:
        count = getattr(config, field, None)
        if count is not None:
            setattr(new, field, sum(1 for i in layers if i < count))
    previous = getattr(config, 'composer_kd_pruning', None)
    if isinstance(previous, dict) and isinstance(previous.get('kept_layers'), list):  # cut twice: of the original
        original = previous['kept_layers']
        new.composer_kd_pruning = {'kept_layers': [original[i] for i in layers],
                                   'source_layers': previous['source_layers']}
    else:
        new.composer_kd_pruning = {'kept_layers': list(layers), 'source_layers': depth}
    return new


def cut_state_dict(state: Mapping[str, torch.Tensor], family: Family, layers: Sequence[int]) -> dict[str, torch.Tensor]:
    """The source's weights for the student: the kept blocks' renumbered 0, 1, … in order, every weight outside the
    blocks as it is, the other blocks' left out. The tensors are the source's (not copied)."""
    prefix = family.blocks + '.'
    new_index = {str(old): str(new) for new, old in enumerate(layers)}
    out = {}
    for key, value in state.items():
        if not key.startswith(prefix):
            out[key] = value
            continue
        index, _, rest = key[len(prefix):].partition('.')
        if index in new_index:
            out[f'{prefix}{new_index[index]}.{rest}'] = value
    return out


def _build(config: PretrainedConfig, dtype: torch.dtype, attn_implementation: Optional[str]) -> PreTrainedModel:
    """The model of ``config`` with its parameters on ``meta`` (buffers, such as rotary tables, real)."""
    kwargs: dict[str, Any] = {'torch_dtype': dtype}
    if attn_implementation is not None:
        kwargs['attn_implementation'] = attn_implementation
    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config, **kwargs)


def empty_cut_model(source_config: PretrainedConfig, layers: Sequence[int], dtype: torch.dtype = torch.float32,
                    attn_implementation: Optional[str] = None) -> PreTrainedModel:
    """The student ``cut_model`` would make, with its parameters on ``meta``: what ranks without the source's weights
    build under ``init_device: mixed`` (FSDP fills them from rank 0)."""
    model = _build(cut_config(source_config, layers), dtype, attn_implementation)
    model.tie_weights()  # Hugging Face's tying does not take on meta
    return model


def cut_model(source: PreTrainedModel, layers: Sequence[int], dtype: Optional[torch.dtype] = None,
              attn_implementation: Optional[str] = None) -> PreTrainedModel:
    """A new model of the blocks ``layers`` of ``source`` (``select_layers``), holding copies of its weights.

    Args:
        source (PreTrainedModel): a model of a family in ``FAMILIES``; left unchanged, shares no storage with the
            result.
        layers (Sequence[int]): increasing block indices.
        dtype (torch.dtype, optional): the student's dtype. Default: the source's.
        attn_implementation (str, optional): Hugging Face's attention implementation. Default: the config's.

    Returns:
        PreTrainedModel: the student, in training mode, its generation config the source's.

    Raises:
        ValueError: for an unsupported family or blocks out of range.
    """
    family = family_of(source.config)
    layers = select_layers(getattr(source.config, family.depth), layers=layers)
    dtype = dtype or source.dtype
    model = _build(cut_config(source.config, layers), dtype, attn_implementation)
    copies: dict[int, torch.Tensor] = {}  # one copy per source tensor: tied weights stay one tensor
    state = {}
    for key, value in cut_state_dict(source.state_dict(keep_vars=True), family, layers).items():
        if id(value) not in copies:
            copies[id(value)] = value.detach().to(dtype=dtype, copy=True)
        state[key] = copies[id(value)]
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    if getattr(source, 'generation_config', None) is not None:
        model.generation_config = copy.deepcopy(source.generation_config)
    return model.train()

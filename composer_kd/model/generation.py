"""Generating continuations of prompts inside a training run, under DDP, FSDP1 or FSDP2.

Shapes: B prompts, P prompt width (left-padded), N generated width (≤ ``max_new_tokens``).

``generate`` runs in eval mode, under ``no_grad``, with the KV cache on whatever the model's config says (LLM
Foundry builds configs with ``use_cache: false``, which would decode quadratically), and with ``synced_gpus``
on several processes: a process whose rows have all ended keeps stepping with the others until every process
is done, so sharded weights are gathered in lockstep and nobody waits forever. Under FSDP1 the weights at the
root of the wrapped model (its embeddings and head) are gathered around the call (``summon_full_params(...,
recurse=False)``, as Composer's ``HuggingFaceModel.generate`` does) after one dummy forward through the root
(compose-rl does the same: it runs FSDP1's lazy initialisation through the wrapper); FSDP2 needs neither, but its
forward pre-hook rebuilds every keyword argument through ``tree_map`` to cast floating inputs to the parameters'
dtype (``cast_forward_inputs``, on by default even in fp32), and Hugging Face's ``DynamicCache`` is a pytree node:
the model then fills a copy of the KV cache, ``generate`` keeps the empty original, and every decoding step after
the first sees no past (measured: scores 0.4 off, continuations different). The cast is turned off during
generation (the inputs are token ids; the cache is already in the compute dtype).
Decoding is greedy over the scores of ``SeededGumbelSampler``, which samples.
"""

import contextlib
import dataclasses
from typing import Any, Iterator, Sequence

import torch
from transformers import GenerationConfig, LogitsProcessorList

from composer_kd.model.sampling import SeededGumbelSampler

__all__ = ['generate_continuations', 'no_fsdp2_input_casts']


@contextlib.contextmanager
def no_fsdp2_input_casts(model: torch.nn.Module) -> Iterator[None]:
    """FSDP2 units of ``model`` leave forward inputs as they are (see the module); restored afterwards."""
    from torch.distributed.fsdp import FSDPModule
    # FSDP2's per-module state (torch 2.7's _get_fsdp_state / _mp_policy); tests/test_dependency_internals.py fails by
    # name if a torch upgrade changes it.
    states = [m._get_fsdp_state() for m in model.modules() if isinstance(m, FSDPModule)]
    saved = [state._mp_policy for state in states]
    for state in states:
        state._mp_policy = dataclasses.replace(state._mp_policy, cast_forward_inputs=False)
    try:
        yield
    finally:
        for state, policy in zip(states, saved):
            state._mp_policy = policy


@contextlib.contextmanager
def _generating(model: torch.nn.Module, fsdp_root: torch.nn.Module) -> Iterator[None]:
    """Eval mode, no gradients, under FSDP1 the root's weights gathered, under FSDP2 no input casts."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if isinstance(fsdp_root, FullyShardedDataParallel):
                with FullyShardedDataParallel.summon_full_params(fsdp_root, writeback=False, recurse=False):
                    yield
            else:
                yield
    finally:
        model.train(was_training)


def _prime_fsdp1(fsdp_root: torch.nn.Module, call: Any) -> None:
    """One tiny forward through an FSDP1 root, so its lazy initialisation runs through the wrapper."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    if isinstance(fsdp_root, FullyShardedDataParallel) and not getattr(fsdp_root, '_composer_kd_primed', False):
        with torch.no_grad():
            call()
        fsdp_root._composer_kd_primed = True


def generate_continuations(model: torch.nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                           sampler: SeededGumbelSampler, max_new_tokens: int, eos_ids: Sequence[int],
                           pad_token_id: int, world_size: int, fsdp_root: torch.nn.Module | None = None,
                           prime: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Continuations of left-padded prompts, sampled by ``sampler``.

    Args:
        model (Module): a Hugging Face causal LM (it has ``generate``), possibly inside FSDP units.
        prompt_ids (Tensor): ``(B, P)`` left-padded. prompt_mask (Tensor): ``(B, P)``.
        sampler (SeededGumbelSampler): the rows' sampler (its keys are the rows').
        max_new_tokens (int): the generation budget.
        eos_ids (Sequence[int]): ids that end a continuation.
        pad_token_id (int): what ``generate`` writes after a row has ended.
        world_size (int): processes taking part (``synced_gpus`` when > 1).
        fsdp_root (Module, optional): the FSDP unit that owns ``model``'s root weights (an FSDP1 wrapper is
            summoned around the call). Default: ``model``.
        prime (Callable, optional): a tiny forward through ``fsdp_root`` run once before the first generation under
            FSDP1.

    Returns:
        ``(tokens (B, N), logprobs (B, N))``: the generated tokens (``pad_token_id`` after a row's end) and the
        log-probability each was sampled with.
    """
    root = fsdp_root if fsdp_root is not None else model
    if prime is not None:
        _prime_fsdp1(root, prime)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, use_cache=True,
                              pad_token_id=pad_token_id, eos_token_id=list(eos_ids), return_dict_in_generate=False,
                              temperature=None, top_p=None, top_k=None)
    with _generating(model, root), no_fsdp2_input_casts(model):
        sequences = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=config,
                                   logits_processor=LogitsProcessorList([sampler]), synced_gpus=world_size > 1)
    tokens = sequences[:, prompt_ids.shape[1]:]
    return tokens, sampler.taken_logprobs(tokens.shape[1])

"""Rotary position tables kept in float32, whatever casts the model's buffers.

Shapes: D/2 the rotary frequencies of one attention head (``inv_freq``).

Hugging Face models keep RoPE's frequencies in a non-persistent float32 buffer, ``inv_freq``. Casts meant for the
weights reach it: FSDP1's mixed precision casts every floating buffer to ``buffer_dtype`` (bf16 under Composer's
``PURE`` and ``DEFAULT``) on its first forward, and LLM Foundry's ``master_weights_dtype`` runs ``model.to(bf16)``.
In bf16 the frequencies are off by up to 2^-9 of their value, so the phase at distance p is off by up to
p·2^-9 — ~0.9 rad at 512 for Llama-3.1 — and the student learns a RoPE that inference with transformers never
uses. A forward pre-hook on each module that owns ``inv_freq`` puts the float32 values back whenever the buffer
is found in another dtype; the float32 copy is a plain attribute, which no cast of the module touches.
"""

import torch

__all__ = ['keep_rotary_float32']

_REFERENCE = '_composer_kd_inv_freq_float32'  # the float32 copy, a plain attribute of the rotary module


def _restore_float32(module: torch.nn.Module, args: tuple) -> None:
    buffer = module.inv_freq
    if buffer.dtype == torch.float32:
        return
    reference = getattr(module, _REFERENCE)
    if reference.device != buffer.device:
        reference = reference.to(buffer.device)
        setattr(module, _REFERENCE, reference)
    buffer.data = reference  # in place, as FSDP1 casts it: the buffer stays the same object


def keep_rotary_float32(model: torch.nn.Module) -> int:
    """Makes every ``inv_freq`` buffer of ``model`` float32 inside the forward of its module, from now on.

    Call it on a model whose buffers are still the ones it was built with (before any wrapping or cast); a
    module's ``original_inv_freq`` (Hugging Face's float32 copy for dynamic RoPE) is preferred when present.

    Returns:
        int: the number of rotary modules guarded (0 for models without RoPE, such as GPT-2).
    """
    guarded = 0
    for module in model.modules():
        buffer = module._buffers.get('inv_freq')
        if buffer is None or not buffer.is_floating_point() or buffer.is_meta or hasattr(module, _REFERENCE):
            continue
        original = getattr(module, 'original_inv_freq', None)
        usable = isinstance(original, torch.Tensor) and original.dtype == torch.float32 and original.shape == buffer.shape
        setattr(module, _REFERENCE, (original if usable else buffer).detach().to(torch.float32, copy=True))
        module.register_forward_pre_hook(_restore_float32)
        guarded += 1
    return guarded

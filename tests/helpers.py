"""Small builders shared by the tests."""

import torch
from transformers import GPT2Config, GPT2LMHeadModel


def tiny_gpt2(vocab_size: int = 48, n_layer: int = 1, n_embd: int = 16, seed: int = 0,
              dtype: torch.dtype = torch.float32) -> GPT2LMHeadModel:
    """A deterministic tiny GPT-2 with dropout off."""
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab_size, n_layer=n_layer, n_embd=n_embd, n_head=2, n_positions=64,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config).to(dtype)

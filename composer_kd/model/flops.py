"""Model FLOPs of a distillation step, in LLM Foundry's convention, for Composer's ``speed_monitor`` (MFU).

Per token a causal LM's forward costs 2·N multiply-adds over its weight matrices (N excludes lookup tables: the
input embedding, unless it is tied to the LM head, and learned positions) plus attention's two T×T products,
4·L·H·T per token. A training step of the student costs 3 forwards (backward ≈ 2 forwards); each teacher runs
one forward and no backward; a precomputed teacher costs nothing per step. Padding is counted as tokens.
"""

from transformers import PreTrainedModel

__all__ = ['matmul_params', 'forward_flops']


def matmul_params(model: PreTrainedModel) -> int:
    """Parameters that take part in matrix products: all of them less the lookup tables (call before sharding:
    FSDP may leave only a shard on this rank)."""
    total = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings()
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is embedding.weight
    if not tied:
        total -= embedding.weight.numel()
    for name, module in model.named_modules():  # learned positions (GPT-2's wpe, OPT's embed_positions)
        if name.rsplit('.', 1)[-1] in ('wpe', 'embed_positions', 'position_embeddings') and hasattr(module, 'weight'):
            total -= module.weight.numel()
    return total


def forward_flops(params: int, layers: int, hidden: int, batch_size: int, seq_len: int) -> int:
    """FLOPs of one forward over a ``(batch_size, seq_len)`` batch: weights and attention (see the module)."""
    return batch_size * seq_len * (2 * params + 4 * layers * hidden * seq_len)

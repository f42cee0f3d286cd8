"""``HeadTap``: takes a Hugging Face causal LM's final hidden states and LM head at the head's own call, so the
loss can apply the head chunk by chunk (``fused_distillation_loss``) and the model never computes its logits.

Shapes: B batch, T sequence length, H hidden size, V' the head's output rows.

The split is found generically: the head is ``model.get_output_embeddings()`` (an ``nn.Linear``: GPT-2, Llama,
Qwen2, Mistral, Phi-3, Gemma, …) and its input is the final hidden state after the final norm, whatever the
model calls them. Two forward hooks on the head do the work while a tap is active: the pre-hook keeps the
hidden states and hands the head an empty ``(B, 0, H)`` input (so its matmul costs nothing), and the hook
replaces the head's output with what the tap returns.

Working inside the head's call is what makes it right under FSDP: the head's weight is unsharded exactly then
(by the FSDP unit that owns it, FSDP1 or FSDP2, whichever module that is), and the loss returned through the
model's output keeps FSDP's backward hooks on the path of the gradient. A teacher's weight is copied out of
the call when the teacher is sharded (FSDP frees the gathered weight when the call ends) and referenced
otherwise.

Models that change their logits after the head (Gemma-2's soft-capping, Cohere's and Granite's logit scales)
cannot be split this way: ``head_split_refusal`` names them, and a tap refuses any model whose output is not
the tensor the head returned.
"""

import contextlib
from typing import Any, Callable, Iterator, Optional

import torch
from transformers import PreTrainedModel

from composer_kd.losses.fused import LinearHead

__all__ = ['HeadTap', 'head_split_refusal']

# Config keys of Hugging Face models that transform the logits after the LM head, and their neutral values.
_POST_HEAD_TRANSFORMS = {'final_logit_softcapping': (None, 0, 0.0), 'logit_scale': (None, 1, 1.0),
                         'logits_scaling': (None, 1, 1.0)}


def head_split_refusal(model: PreTrainedModel) -> Optional[str]:
    """Why ``model``'s logits cannot be computed from its final hidden states by its head alone; None if they can."""
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        return (f'{type(model).__name__} has no nn.Linear output head (get_output_embeddings() returned '
                f'{type(head).__name__})')
    for key, neutral in _POST_HEAD_TRANSFORMS.items():
        value = getattr(model.config, key, None)
        if value not in neutral:
            return f'{type(model).__name__} transforms its logits after the head ({key}={value!r})'
    return None


class HeadTap:
    """Forward hooks on a model's LM head; inert until ``capture()`` or ``replace()`` is active.

    Args:
        model (PreTrainedModel): a causal LM whose head ``head_split_refusal`` accepts.

    Raises:
        ValueError: naming why the model cannot be split.
    """

    def __init__(self, model: PreTrainedModel) -> None:
        reason = head_split_refusal(model)
        if reason is not None:
            raise ValueError(f'fused_head cannot split this model: {reason}; set fused_head: false')
        self.model_name = type(model).__name__
        self.head = model.get_output_embeddings()
        self._on_head: Optional[Callable[[LinearHead], torch.Tensor]] = None
        self._hidden: Optional[torch.Tensor] = None
        self._returned: Optional[torch.Tensor] = None
        self.head.register_forward_pre_hook(self._pre_hook)
        self.head.register_forward_hook(self._hook)

    def _pre_hook(self, module: torch.nn.Module, args: tuple[Any, ...]) -> Optional[tuple[Any, ...]]:
        if self._on_head is None:
            return None
        self._hidden = args[0]
        return (args[0][..., :0, :],) + args[1:]  # (B, 0, H): the head's own matmul does nothing

    def _hook(self, module: torch.nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> Optional[torch.Tensor]:
        if self._on_head is None:
            return None
        hidden, self._hidden = self._hidden, None
        assert hidden is not None, 'the pre-hook runs before the hook'
        self._returned = self._on_head(LinearHead(hidden, module.weight, module.bias))
        return self._returned

    @contextlib.contextmanager
    def replace(self, on_head: Callable[[LinearHead], torch.Tensor]) -> Iterator[None]:
        """While active, the head's call returns ``on_head(LinearHead(hidden, weight, bias))`` instead of logits.

        The weight is valid only during the call (FSDP may free it after); ``on_head`` must use it there.
        """
        self._on_head, self._returned = on_head, None
        try:
            yield
        finally:
            self._on_head, self._hidden = None, None

    def check_output(self, logits: torch.Tensor) -> torch.Tensor:
        """Returns ``logits`` (the model's output) if it is what the head returned, else refuses the model."""
        returned, self._returned = self._returned, None
        if returned is None:
            raise RuntimeError(f'{self.model_name} did not call its output head (get_output_embeddings()) in forward')
        if logits is not returned:
            raise ValueError(f'fused_head cannot split {self.model_name}: it changes the LM head\'s output before '
                             'returning it as logits; set fused_head: false')
        return logits

    def capture(self, call: Callable[[], Any], copy: bool) -> LinearHead:
        """Runs ``call()`` (the model's forward) and returns the head's input and weights, valid after the call
        (``copy``: the weights are copied, as they must be when FSDP shards the model). The model's logits are
        never computed."""
        captured: list[LinearHead] = []

        def keep(head: LinearHead) -> torch.Tensor:
            weight, bias = head.weight.detach(), None if head.bias is None else head.bias.detach()
            captured.append(LinearHead(head.hidden.detach(), weight.clone() if copy else weight,
                                       None if bias is None else bias.clone() if copy else bias))
            return head.hidden.new_zeros(head.hidden.shape[:-1] + (0,))  # a placeholder for the logits

        with self.replace(keep):
            output = call()
        self.check_output(output.logits)
        return captured[0]

"""``FrozenTeachers``: one or more frozen teacher LMs as a single child of the Composer model, giving one set of
teacher logits per batch (a single teacher's own, or the ensemble's from ``ensemble_teacher_logits``).

Shapes: B batch, T sequence length, V the shared vocabulary (``len(tokenizer)``), V' a model's output rows.

Composer makes every direct child of the ``ComposerModel`` its own FSDP root and asks that child's
``fsdp_wrap_fn`` which descendants become units; this container answers for all its teachers (each teacher and
each of its transformer blocks), so every teacher is sharded block by block and none is ever
activation-checkpointed. FSDP1 also asks the child alone for ``param_init_fn`` (weights built on ``meta``): the
container hands each module to the teacher that owns it.
"""

import functools
from typing import Any, Iterator, Optional, Sequence

import torch
from transformers import PreTrainedModel

from composer_kd.losses.ensemble import ENSEMBLE_MODES, check_ensemble_weights, ensemble_teacher_logits
from composer_kd.losses.fused import LinearHead
from composer_kd.model.fsdp import is_sharded, prepare_for_fsdp
from composer_kd.model.head_tap import HeadTap

__all__ = ['FrozenTeachers']


def _wraps(teachers: tuple[torch.nn.Module, ...], block_names: frozenset[str], module: torch.nn.Module) -> bool:
    return any(module is t for t in teachers) or type(module).__name__ in block_names


def _never(module: torch.nn.Module) -> bool:
    del module
    return False


class FrozenTeachers(torch.nn.Module):
    """Frozen causal LMs (no gradients, always in eval mode) and how their outputs combine.

    Args:
        teachers (Sequence[PreTrainedModel]): M ≥ 1 models sharing the tokenizer's vocabulary.
        weights (Sequence[float], optional): M positive weights, normalised to sum 1. Default: equal.
        ensemble (str): ``'probs'`` (mixture of tempered distributions) or ``'logits'`` (weighted mean of logits);
            see ``composer_kd.losses.ensemble``. Irrelevant for one teacher. Default: ``'probs'``.
        heads (bool): also give each teacher's final hidden states and LM head instead of logits
            (``forward(..., heads=True)``, for ``fused_distillation_loss``). Default: ``False``.
    """

    def __init__(self, teachers: Sequence[PreTrainedModel], weights: Optional[Sequence[float]] = None,
                 ensemble: str = 'probs', heads: bool = False) -> None:
        if ensemble not in ENSEMBLE_MODES:
            raise ValueError(f'ensemble must be one of {list(ENSEMBLE_MODES)}, got {ensemble!r}')
        super().__init__()
        # A plain Module around the list: FSDP2 refuses to shard a ModuleList itself.
        self.members = torch.nn.ModuleList(teachers)
        self.weights = check_ensemble_weights(weights, len(teachers))
        self.ensemble = ensemble
        for teacher in teachers:
            teacher.requires_grad_(False)
            teacher.eval()
            prepare_for_fsdp(teacher, frozen=True)  # also right when a teacher is used on its own
        block_names = frozenset(name for t in teachers for name in (getattr(t, '_no_split_modules', None) or ()))
        self.fsdp_wrap_fn = functools.partial(_wraps, tuple(teachers), block_names)
        self.activation_checkpointing_fn = _never
        self._taps = [HeadTap(t) for t in teachers] if heads else None

    def param_init_fn(self, module: torch.nn.Module) -> None:
        """Initialises ``module`` (built on ``meta``) as the teacher that owns it does (``prepare_for_fsdp``)."""
        for teacher in self.members:
            if any(m is module for m in teacher.modules()):
                teacher.param_init_fn(module)
                return
        raise ValueError(f'{type(module).__name__} belongs to none of the teachers')

    def train(self, mode: bool = True) -> 'FrozenTeachers':
        del mode
        return super().train(False)

    def __len__(self) -> int:
        return len(self.members)

    def __iter__(self) -> Iterator[torch.nn.Module]:
        return iter(self.members)

    def __getitem__(self, index: int) -> torch.nn.Module:
        return self.members[index]

    def _each(self, inputs: dict[str, Any], vocab_size: int) -> Iterator[torch.Tensor]:
        for teacher in self.members:
            yield teacher(**inputs).logits[..., :vocab_size]

    @torch.no_grad()
    def forward(self, inputs: dict[str, Any], vocab_size: int, temperature: float,
                heads: bool = False) -> torch.Tensor | list[LinearHead]:
        """The teacher logits ``(B, T, V)`` of a batch: the teacher's own for one teacher (in its dtype), else the
        ensemble's (float32) at ``temperature``. Every teacher runs, on every rank (FSDP needs it).

        With ``heads=True`` (built with ``heads=True``) each teacher's final hidden states ``(B, T, H)`` and LM head
        instead, one ``LinearHead`` per teacher: no logits are computed.

        Called as ``teachers(inputs, ...)``, so an FSDP-wrapped container runs its root forward first."""
        if heads:
            if self._taps is None:
                raise ValueError('FrozenTeachers(heads=False) gives logits only')
            copy = is_sharded(self)
            return [tap.capture(lambda t=teacher: t(**inputs), copy) for tap, teacher in zip(self._taps, self.members)]
        if len(self) == 1:
            return self.members[0](**inputs).logits[..., :vocab_size]
        return ensemble_teacher_logits(self._each(inputs, vocab_size), self.weights, self.ensemble, temperature)

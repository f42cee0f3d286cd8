"""Hidden-state distillation inside ``DistillationModel``: which student block is compared with which teacher block,
forward hooks that keep those blocks' outputs (and nothing else) during a training forward, and the projections
from the student's width to the teacher's.

Shapes: B batch, T sequence length, H_s / H_t the student's / teacher's hidden size, L_s / L_t their numbers of blocks,
P pairs.

A block's output is the residual stream after it, as the model hands it to the next block (the last block's is
before the final norm). No ``output_hidden_states=True`` copy of every layer is made: a hook is put on each paired
block for the duration of one forward (``capture()``) and keeps that block's output. The hooks go on the module that
stands at the block's place *at that moment* — Composer's activation-checkpointing wrapper or an FSDP1 unit when
there is one — so the kept student state is the one autograd differentiates, whatever wraps the block.

The projections (one bias-free ``nn.Linear(H_s, H_t)`` per pair, only when the widths differ) are this module's
parameters: ``DistillationModel`` holds it as a direct child, so Composer shards it as an FSDP root of its own, it
is in the model's ``state_dict`` (checkpointed and resumed as ``hidden_states.projections.*``), ``composer-kd train``
gives them to the optimizer with the student's, and neither ``export`` nor ``hf_checkpointer`` (the student alone)
writes them. The term itself is ``composer_kd.losses.hidden_states``.
"""

import contextlib
from typing import Any, Iterator, Optional, Sequence

import torch
from transformers import PreTrainedModel

from composer_kd.losses.hidden_states import HIDDEN_STATE_LOSSES, hidden_state_loss

__all__ = ['HiddenStateDistillation', 'PROJECTIONS', 'kept_layers', 'resolve_pairs', 'transformer_blocks',
           'uniform_pairs']

PROJECTIONS = ('auto', 'linear', 'none')
_PROJECTION_SEED = 20261203  # projections start the same on every rank and in every run, whatever the RNG did


def transformer_blocks(model: PreTrainedModel) -> torch.nn.ModuleList:
    """The model's transformer blocks, in order: the ``ModuleList`` of its ``_no_split_modules`` class (GPT-2's
    ``transformer.h``, Llama's ``model.layers``, ...), wrapped or not.

    Raises:
        ValueError: naming the model when it has no such list.
    """
    names = set(getattr(model, '_no_split_modules', None) or ())
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) and all(
                type(_unwrapped(block)).__name__ in names for block in module):
            return module
    raise ValueError(f'cannot find the transformer blocks of {type(model).__name__} (no list of its '
                     f'_no_split_modules {sorted(names)})')


def _unwrapped(module: torch.nn.Module) -> torch.nn.Module:
    """The block inside activation-checkpointing and FSDP1 wrappers."""
    while hasattr(module, '_checkpoint_wrapped_module') or hasattr(module, '_fsdp_wrapped_module'):
        module = getattr(module, '_checkpoint_wrapped_module', None) or module._fsdp_wrapped_module
    return module


def uniform_pairs(student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    """Student block i ↔ teacher block ``round((i+1)·L_t/L_s) − 1`` (halves round up): each student block is paired
    with the teacher block that ends the same share of the depth, the last with the last."""
    return [(i, (2 * (i + 1) * teacher_layers + student_layers) // (2 * student_layers) - 1)
            for i in range(student_layers)]


def kept_layers(student: PreTrainedModel, teacher_layers: int) -> Optional[list[int]]:
    """The teacher blocks a student was cut from (``model/layer_pruning.py`` records them in its config), if it was cut
    from a model as deep as this teacher; else None."""
    record = getattr(student.config, 'composer_kd_pruning', None)
    if not isinstance(record, dict) or record.get('source_layers') != teacher_layers:
        return None
    layers = record.get('kept_layers')
    return list(layers) if isinstance(layers, list) and len(layers) == student.config.num_hidden_layers else None


def resolve_pairs(pairs: str | Sequence[Sequence[int]], student_layers: int, teacher_layers: int,
                  kept: Optional[list[int]] = None) -> list[tuple[int, int]]:
    """``'uniform'`` (or a student cut from the teacher: each block with the block it was copied from, ``kept``) or an
    explicit list of ``[student_block, teacher_block]`` pairs → the checked pairs.

    Raises:
        ValueError: for a block out of range (naming the depths) or a repeated pair.
    """
    if isinstance(pairs, str):
        if pairs != 'uniform':
            raise ValueError(f'pairs must be \'uniform\' or a list of [student_block, teacher_block], got {pairs!r}')
        return list(enumerate(kept)) if kept is not None else uniform_pairs(student_layers, teacher_layers)
    resolved = [tuple(int(i) for i in pair) for pair in pairs]
    if not resolved or any(len(pair) != 2 for pair in resolved):
        raise ValueError(f'pairs must be a non-empty list of [student_block, teacher_block], got {list(pairs)!r}')
    for s, t in resolved:
        if not (0 <= s < student_layers and 0 <= t < teacher_layers):
            raise ValueError(f'pair [{s}, {t}] is out of range: the student has {student_layers} blocks (0-'
                             f'{student_layers - 1}), the teacher {teacher_layers} (0-{teacher_layers - 1})')
    if len(set(resolved)) != len(resolved):
        raise ValueError(f'pairs repeat a pair: {[list(p) for p in resolved]}')
    return resolved  # type: ignore[return-value]


class _BlockTaps:
    """Keeps the outputs of some blocks of one model while ``capture()`` is active."""

    def __init__(self, model: PreTrainedModel, indices: Sequence[int], side: str) -> None:
        self.blocks = transformer_blocks(model)
        self.indices = sorted(set(indices))
        self.side = side
        self.kept: dict[int, torch.Tensor] = {}

    def _keep(self, index: int, output: Any) -> None:
        state = output[0] if isinstance(output, (tuple, list)) else output
        if not isinstance(state, torch.Tensor):
            raise ValueError(f'{self.side} block {index} returned {type(state).__name__}, not a (B, T, H) tensor')
        if index in self.kept:
            raise RuntimeError(f'{self.side} block {index} ran twice in one forward')
        self.kept[index] = state

    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        self.kept = {}
        # On the module at the block's place now: a checkpoint or FSDP1 wrapper if one was put there since.
        handles = [self.blocks[i].register_forward_hook(lambda m, a, out, i=i: self._keep(i, out)) for i in self.indices]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def take(self, indices: Sequence[int]) -> list[torch.Tensor]:
        kept, self.kept = self.kept, {}
        missing = [i for i in self.indices if i not in kept]
        if missing:
            raise RuntimeError(f'{self.side} blocks {missing} did not run in the forward')
        return [kept[i] for i in indices]


class HiddenStateDistillation(torch.nn.Module):
    """The hidden-state term of one student and one teacher: taps on the paired blocks and the projections.

    Args:
        student (PreTrainedModel): the student (the hooks go on its blocks).
        teacher (PreTrainedModel): the teacher (one model; its outputs are taken without gradient).
        pairs (str | Sequence): ``'uniform'`` (``uniform_pairs``; a student cut from this teacher: the blocks it
            kept) or ``[[student_block, teacher_block], ...]``. Default: ``'uniform'``.
        loss (str): ``cosine``, ``mse`` or ``normalized_mse`` (``composer_kd.losses.hidden_states``). Default:
            ``'cosine'``.
        weight (float): the term's weight in the total loss (> 0). Default: ``1.0``.
        projection (str): ``auto`` (a trainable bias-free ``Linear(H_s, H_t)`` per pair, in the student's dtype, when
            the widths differ; none when equal), ``linear`` (one per pair always, started at the identity when the widths are equal) or
            ``none`` (the widths must be equal). Default: ``'auto'``.

    Raises:
        ValueError: for a setting out of its range, blocks out of range, or ``projection='none'`` with different
            widths.
    """

    def __init__(self, student: PreTrainedModel, teacher: PreTrainedModel, pairs: str | Sequence[Sequence[int]] =
                 'uniform', loss: str = 'cosine', weight: float = 1.0, projection: str = 'auto') -> None:
        if loss not in HIDDEN_STATE_LOSSES:
            raise ValueError(f'loss must be one of {sorted(HIDDEN_STATE_LOSSES)}, got {loss!r}')
        if projection not in PROJECTIONS:
            raise ValueError(f'projection must be one of {list(PROJECTIONS)}, got {projection!r}')
        if not weight > 0:
            raise ValueError(f'weight must be > 0, got {weight!r}')
        super().__init__()
        student_layers, teacher_layers = len(transformer_blocks(student)), len(transformer_blocks(teacher))
        self.pairs = resolve_pairs(pairs, student_layers, teacher_layers, kept_layers(student, teacher_layers))
        self.loss_name, self.weight = loss, float(weight)
        widths = (student.config.hidden_size, teacher.config.hidden_size)
        if projection == 'none' and widths[0] != widths[1]:
            raise ValueError(f'projection: none needs equal widths; the student\'s is {widths[0]}, the teacher\'s '
                             f'{widths[1]} (use auto)')
        project = projection == 'linear' or (projection == 'auto' and widths[0] != widths[1])
        # In the student's dtype: trained like its weights.
        self.projections = torch.nn.ModuleList(_projection(*widths, seed=i).to(student.dtype)
                                               for i in range(len(self.pairs))) if project else None
        self._student = _BlockTaps(student, [s for s, _ in self.pairs], 'student')
        self._teacher = _BlockTaps(teacher, [t for _, t in self.pairs], 'teacher')
        # Composer wraps each direct child of the model as an FSDP root: the projections are that root's only unit.
        self.fsdp_wrap_fn = _never
        self.activation_checkpointing_fn = _never

    def param_init_fn(self, module: torch.nn.Module) -> None:
        """Initialises a projection built on ``meta`` (FSDP's ``init_device: meta`` path)."""
        for i, projection in enumerate(self.projections or ()):
            if module is projection:
                _initialise(projection, seed=i)

    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        """While active, the paired blocks of both models keep their outputs for ``take()``."""
        with self._student.capture(), self._teacher.capture():
            yield

    def take(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The states kept by the last ``capture()``: P student states ``(B, T, H_s)`` and P teacher states
        ``(B, T, H_t)``, pair by pair; the taps forget them."""
        return (self._student.take([s for s, _ in self.pairs]), self._teacher.take([t for _, t in self.pairs]))

    def forward(self, students: Sequence[torch.Tensor], teachers: Sequence[torch.Tensor],
                labels: torch.Tensor) -> torch.Tensor:
        """The unweighted term (``hidden_state_loss``) of one microbatch: the student's states projected, against the
        teacher's. Called as a module, so an FSDP-wrapped one gathers its projections first."""
        if self.projections is not None:
            students = [projection(state.to(projection.weight.dtype))
                        for projection, state in zip(self.projections, students)]
        return hidden_state_loss(students, [t.detach() for t in teachers], labels, loss=self.loss_name)

    def extra_repr(self) -> str:
        return f'pairs={self.pairs}, loss={self.loss_name!r}, weight={self.weight}'


def _never(module: torch.nn.Module) -> bool:
    del module
    return False


def _initialise(projection: torch.nn.Linear, seed: int) -> None:
    """The identity for equal widths (a student cut from the teacher starts with nothing to correct), else
    ``nn.Linear``'s own uniform(±1/√H_s), drawn from a fixed seed (one per pair)."""
    with torch.no_grad():
        if projection.in_features == projection.out_features:
            projection.weight.copy_(torch.eye(projection.in_features))
        else:
            bound = projection.in_features**-0.5
            generator = torch.Generator().manual_seed(_PROJECTION_SEED + seed)
            weight = torch.empty(projection.weight.shape).uniform_(-bound, bound, generator=generator)
            projection.weight.copy_(weight)


def _projection(student_width: int, teacher_width: int, seed: int) -> torch.nn.Linear:
    projection = torch.nn.Linear(student_width, teacher_width, bias=False)
    _initialise(projection, seed)
    return projection

"""One teacher distribution from several: the weighted mixture of their tempered distributions, or the weighted
mean of their logits.

Shapes: B batch, T sequence length, V vocabulary, M teachers.

The result is returned as *logits* ``e`` ``(B, T, V)`` whose ``softmax(e / T)`` is the ensemble's distribution
at temperature T, so every loss and metric that takes dense teacher logits takes an ensemble unchanged:

* ``probs``:  ``e = T · log Σ_m w_m · softmax(t_m / T)``  — the mixture of the tempered distributions;
* ``logits``: ``e = Σ_m w_m · t_m``                        — one teacher with averaged logits.

The teachers' logits are consumed one at a time (an iterable), so at most one teacher's logits and the float32
accumulator are alive at once, whatever M is.
"""

import math
from typing import Iterable, Optional, Sequence

import torch
import torch.nn.functional as F

from composer_kd.losses.settings import ENSEMBLE_MODES, check_ensemble_weights

__all__ = ['ENSEMBLE_MODES', 'check_ensemble_weights', 'ensemble_teacher_logits']

def ensemble_teacher_logits(teacher_logits: Iterable[torch.Tensor],
                            weights: Sequence[float],
                            mode: str = 'probs',
                            temperature: float = 1.0) -> torch.Tensor:
    """The ensemble of M teachers as one set of logits (see the module docstring).

    Args:
        teacher_logits (Iterable[Tensor]): M tensors ``(B, T, V)`` (any float dtype), e.g. a generator that runs
            each teacher in turn; all must have the same shape.
        weights (Sequence[float]): M positive weights summing to 1 (``check_ensemble_weights``).
        mode (str): ``'probs'`` or ``'logits'``. Default: ``'probs'``.
        temperature (float): the distillation temperature T (> 0); ``probs`` mixes ``softmax(t_m / T)``.
            Default: ``1.0``.

    Returns:
        Tensor: ``(B, T, V)`` float32 (float64 for float64 input). A single teacher with weight 1 is returned
        unchanged in ``logits`` mode and as ``T · log_softmax(t / T)`` (the same distribution) in ``probs`` mode.

    Raises:
        ValueError: for an unknown mode, a weight count that does not match, or mismatched shapes.
    """
    if mode not in ENSEMBLE_MODES:
        raise ValueError(f'ensemble must be one of {list(ENSEMBLE_MODES)}, got {mode!r}')
    acc: Optional[torch.Tensor] = None
    count = 0
    for logits in teacher_logits:
        if count >= len(weights):
            raise ValueError(f'more teachers than the {len(weights)} weights')
        if acc is not None and logits.shape != acc.shape:
            raise ValueError(f'teacher {count} has logits of shape {tuple(logits.shape)}, teacher 0 '
                             f'{tuple(acc.shape)}')
        dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        weight = weights[count]
        if mode == 'logits':
            term = logits.to(dtype) * weight
            acc = term if acc is None else acc.add_(term)
        else:
            term = F.log_softmax(logits.to(dtype) / temperature, dim=-1).add_(math.log(weight))
            acc = term if acc is None else torch.logaddexp(acc, term, out=acc)
        count += 1
    if count != len(weights):
        raise ValueError(f'{count} teachers for {len(weights)} weights')
    assert acc is not None
    return acc.mul_(temperature) if mode == 'probs' else acc

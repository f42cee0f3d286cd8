"""The settings every distillation loss takes, and their checks: divergences and their arguments, ensemble modes
and teacher weights. Plain Python, no torch: ``composer-kd`` checks a config with them before it imports torch.
"""

from typing import Any, Optional, Sequence

__all__ = ['DIVERGENCE_ARGUMENTS', 'ENSEMBLE_MODES', 'check_distillation_args', 'check_ensemble_weights']

# divergence -> {keyword: (default, low, high)}; the bounds are inclusive (``divergences.py`` defines each one).
DIVERGENCE_ARGUMENTS: dict[str, dict[str, tuple[float, float, float]]] = {
    'forward_kl': {},
    'reverse_kl': {},
    'jsd': {'beta': (0.5, 0.0, 1.0)},
    'skew_kl': {'lam': (0.1, 0.0, 1.0)},
    'skew_reverse_kl': {'lam': (0.1, 0.0, 1.0)},
    'tvd': {},
}

ENSEMBLE_MODES = ('probs', 'logits')


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_distillation_args(alpha: float, temperature: float, divergence: str,
                            divergence_kwargs: dict[str, Any]) -> dict[str, float]:
    """Validates the loss hyperparameters; returns the divergence's keyword arguments with defaults filled in.

    Raises:
        ValueError: naming the argument and the value, for any value the loss cannot use.
    """
    if not _is_number(alpha) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f'alpha must be a number in [0, 1], got {alpha!r}')
    if not _is_number(temperature) or not temperature > 0:
        raise ValueError(f'temperature must be a number > 0, got {temperature!r}')
    if divergence not in DIVERGENCE_ARGUMENTS:
        raise ValueError(f'divergence must be one of {sorted(DIVERGENCE_ARGUMENTS)}, got {divergence!r}')
    params = DIVERGENCE_ARGUMENTS[divergence]
    unknown = sorted(set(divergence_kwargs) - set(params))
    if unknown:
        allowed = sorted(params) or 'none'
        raise ValueError(f'divergence {divergence!r} takes no argument {unknown[0]!r} (it takes: {allowed})')
    resolved = {}
    for name, (default, low, high) in params.items():
        value = divergence_kwargs.get(name, default)
        if not _is_number(value) or not low <= value <= high:
            raise ValueError(f'{name} must be a number in [{low}, {high}] for {divergence!r}, got {value!r}')
        resolved[name] = float(value)
    return resolved


def check_ensemble_weights(weights: Optional[Sequence[float]], num_teachers: int) -> list[float]:
    """The weights normalised to sum 1 (equal when ``None``).

    Raises:
        ValueError: for a count other than ``num_teachers`` or a weight that is not a finite positive number.
    """
    if num_teachers < 1:
        raise ValueError('an ensemble needs at least one teacher')
    if weights is None:
        return [1.0 / num_teachers] * num_teachers
    weights = list(weights)
    if len(weights) != num_teachers:
        raise ValueError(f'teacher_weights has {len(weights)} entries for {num_teachers} teachers')
    for w in weights:
        if not _is_number(w) or not 0 < w < float('inf'):
            raise ValueError(f'teacher weights must be positive numbers, got {w!r}')
    total = float(sum(weights))
    return [float(w) / total for w in weights]

"""Per-token divergences between a teacher distribution p and a student distribution q.

Every function takes log-probabilities ``(N, V)`` (N scored tokens, V vocabulary entries) and returns
``(N,)``. All of them stay in log space, so probabilities of exactly zero (``-inf`` log-probs, e.g. masked
vocabulary entries) give finite values and finite gradients.
"""

import math
from typing import Callable

import torch

from composer_kd.losses.settings import DIVERGENCE_ARGUMENTS

__all__ = ['DIVERGENCES', 'kl', 'forward_kl', 'reverse_kl', 'jsd', 'skew_kl', 'skew_reverse_kl', 'tvd']


def kl(a_log: torch.Tensor, b_log: torch.Tensor) -> torch.Tensor:
    """KL(a‖b) = Σ_v a_v (log a_v − log b_v) per row; rows of ``(N, V)`` log-probs in, ``(N,)`` out.

    Terms where a_v = 0 are exactly 0 (the 0·log 0 convention). ``torch.where`` picks before the product, so
    the masked ``-inf - -inf`` never reaches a gradient.
    """
    a = a_log.exp()
    diff = torch.where(a > 0, a_log - b_log, torch.zeros_like(a_log))
    return (a * diff).sum(dim=-1)


def _log_mixture(p_log: torch.Tensor, q_log: torch.Tensor, weight_p: float) -> torch.Tensor:
    """log(weight_p·p + (1 − weight_p)·q), computed with logsumexp."""
    if weight_p == 1.0:
        return p_log
    if weight_p == 0.0:
        return q_log
    return torch.logaddexp(p_log + math.log(weight_p), q_log + math.log1p(-weight_p))


def forward_kl(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """KL(p‖q): mean-seeking; the classic Hinton distillation objective."""
    return kl(p_log, q_log)


def reverse_kl(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """KL(q‖p): mode-seeking (MiniLLM)."""
    return kl(q_log, p_log)


def jsd(p_log: torch.Tensor, q_log: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """Generalised Jensen–Shannon: m = β·p + (1−β)·q; β·KL(p‖m) + (1−β)·KL(q‖m)."""
    m_log = _log_mixture(p_log, q_log, beta)
    return beta * kl(p_log, m_log) + (1.0 - beta) * kl(q_log, m_log)


def skew_kl(p_log: torch.Tensor, q_log: torch.Tensor, lam: float = 0.1) -> torch.Tensor:
    """Skew KL (DistiLLM): KL(p ‖ λ·p + (1−λ)·q)."""
    return kl(p_log, _log_mixture(p_log, q_log, lam))


def skew_reverse_kl(p_log: torch.Tensor, q_log: torch.Tensor, lam: float = 0.1) -> torch.Tensor:
    """Skew reverse KL (DistiLLM): KL(q ‖ (1−λ)·p + λ·q)."""
    return kl(q_log, _log_mixture(p_log, q_log, 1.0 - lam))


def tvd(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """Total variation distance: ½·Σ_v |p_v − q_v|."""
    return 0.5 * (p_log.exp() - q_log.exp()).abs().sum(dim=-1)


# name -> (function, {keyword: (default, low, high)}); the arguments are ``settings.DIVERGENCE_ARGUMENTS``.
DIVERGENCES: dict[str, tuple[Callable[..., torch.Tensor], dict[str, tuple[float, float, float]]]] = {
    name: (function, DIVERGENCE_ARGUMENTS[name])
    for name, function in (('forward_kl', forward_kl), ('reverse_kl', reverse_kl), ('jsd', jsd), ('skew_kl', skew_kl),
                           ('skew_reverse_kl', skew_reverse_kl), ('tvd', tvd))
}

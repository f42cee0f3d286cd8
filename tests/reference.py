"""Slow, independent references in plain Python floats: softmax and the divergences by their textbook
formulas (on probabilities, not in log space)."""

import math


def softmax(row: list[float], temperature: float) -> list[float]:
    scaled = [x / temperature for x in row]
    top = max(scaled)
    exps = [math.exp(x - top) for x in scaled]
    return [e / sum(exps) for e in exps]


def kl(a: list[float], b: list[float]) -> float:
    return sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0)


def divergence(name: str, p: list[float], q: list[float], beta: float = 0.5, lam: float = 0.1) -> float:
    """Textbook formulas on probabilities (not log space)."""
    if name == 'forward_kl':
        return kl(p, q)
    if name == 'reverse_kl':
        return kl(q, p)
    if name == 'jsd':
        m = [beta * x + (1 - beta) * y for x, y in zip(p, q)]
        return beta * kl(p, m) + (1 - beta) * kl(q, m)
    if name == 'skew_kl':
        return kl(p, [lam * x + (1 - lam) * y for x, y in zip(p, q)])
    if name == 'skew_reverse_kl':
        return kl(q, [(1 - lam) * x + lam * y for x, y in zip(p, q)])
    assert name == 'tvd'
    return 0.5 * sum(abs(x - y) for x, y in zip(p, q))

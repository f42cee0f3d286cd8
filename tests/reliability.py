"""The reliability table: tests of faults and bad inputs record what they tried, what the user saw and what
was lost; ``conftest.pytest_sessionfinish`` writes the rows as JSON to ``$COMPOSER_KD_RELIABILITY_JSON``
(when set) — the README's reliability table is filled from that file."""

from typing import Any

ROWS: list[dict[str, Any]] = []


def record(fault: str, user_sees: str, lost: str = 'nothing', traceback: bool = False) -> None:
    """One row: the fault, the first line the user saw, what the run lost, whether a traceback was printed."""
    ROWS.append({'fault': fault, 'user_sees': user_sees, 'lost': lost, 'traceback': traceback})

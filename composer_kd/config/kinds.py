"""The kinds of value a config key takes: each says whether it accepts a YAML value and what it expects, in the
words of the error (``KEY must be WHAT, got VALUE``) and of the config reference.

Plain Python: a config is checked with these before anything imports torch.
"""

import re
from typing import Any, Optional, Sequence

__all__ = [
    'AnyOf', 'Anything', 'Bool', 'Choice', 'Integer', 'Kind', 'ListOf', 'Number', 'Size', 'Text', 'Time', 'is_int', 'is_number',
    'parse_time'
]

# Composer's units (composer.core.TimeUnit) and its time-string grammar (composer/core/time.py, _TIME_STR_REGEX);
# tests/test_config_schema.py checks both against Composer.
TIME_UNITS = ('ep', 'ba', 'sp', 'tok', 'dur', 'iter', 'sec')
_TIME = re.compile(r'^(.+)(' + '|'.join(TIME_UNITS) + r')$', flags=re.IGNORECASE)


def is_int(value: Any) -> bool:
    """An int that is not a bool (YAML's ``true`` is an int to Python)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """An int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse_time(value: Any) -> Optional[tuple[float, str]]:
    """``(amount, unit)`` of a Composer time (``'100ba'``, ``'0.5dur'``, ``'3e4tok'``, or an int: epochs), as
    ``composer.core.Time.from_input(value, 'ep')`` reads it; None if Composer would refuse it."""
    if is_int(value):
        return float(value), 'ep'
    if not isinstance(value, str):
        return None
    match = _TIME.findall(value)
    if len(match) != 1:
        return None
    amount, unit = match[0][0], match[0][1].lower()
    try:
        number = float(amount)
    except ValueError:
        return None
    if unit != 'dur' and int(number) != number:
        return None
    return number, unit


class Kind:
    """A set of values; ``what`` completes "must be …"."""

    what = 'a value'

    def accepts(self, value: Any) -> bool:
        raise NotImplementedError

    def __repr__(self) -> str:
        return self.what


class Anything(Kind):
    """Any value: its owner checks it (Composer's FSDP settings) or a rule does (the refused Foundry keys)."""

    what = 'any value'

    def accepts(self, value: Any) -> bool:
        return True


class Bool(Kind):
    what = 'true or false'

    def accepts(self, value: Any) -> bool:
        return isinstance(value, bool)


class Text(Kind):
    """A non-empty string."""

    def __init__(self, what: str = 'a non-empty string') -> None:
        self.what = what

    def accepts(self, value: Any) -> bool:
        return isinstance(value, str) and value != ''


class Integer(Kind):
    """An integer in ``[low, high)`` (either bound optional), or one of ``also``."""

    def __init__(self, low: Optional[int] = None, high: Optional[int] = None, also: Sequence[int] = (),
                 what: Optional[str] = None) -> None:
        self.low, self.high, self.also = low, high, tuple(also)
        if what is None:
            what = {0: 'an integer ≥ 0', 1: 'a positive integer'}.get(low, f'an integer ≥ {low}') if low is not None \
                else 'an integer'
        self.what = what

    def accepts(self, value: Any) -> bool:
        if not is_int(value):
            return False
        if value in self.also:
            return True
        return (self.low is None or value >= self.low) and (self.high is None or value < self.high)


class Number(Kind):
    """A number with optional bounds; ``low_open``/``high_open`` exclude the bound itself."""

    def __init__(self, low: Optional[float] = None, high: Optional[float] = None, low_open: bool = False,
                 high_open: bool = False, what: Optional[str] = None) -> None:
        self.low, self.high, self.low_open, self.high_open = low, high, low_open, high_open
        if what is None:
            if low is not None and high is not None:
                what = f'a number in {"(" if low_open else "["}{low:g}, {high:g}{")" if high_open else "]"}'
            elif low is not None:
                what = f'a number {">" if low_open else "≥"} {low:g}'
            else:
                what = 'a number'
        self.what = what

    def accepts(self, value: Any) -> bool:
        if not is_number(value) or value != value:
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)


class Choice(Kind):
    """One of ``options`` (``case_insensitive``: any capitalisation)."""

    def __init__(self, options: Sequence[Any], case_insensitive: bool = False, what: Optional[str] = None) -> None:
        self.options, self.case_insensitive = tuple(options), case_insensitive
        self.what = what or f'one of {list(self.options)}'

    def accepts(self, value: Any) -> bool:
        if self.case_insensitive and isinstance(value, str):
            return value.lower() in [str(o).lower() for o in self.options]
        return any(value == o and type(value) is type(o) for o in self.options)


class Time(Kind):
    """A positive Composer time in one of ``units`` (an int is a number of epochs)."""

    def __init__(self, units: Sequence[str] = ('ep', 'ba', 'sp', 'tok'), zero_means: Optional[str] = None) -> None:
        self.units = tuple(units)
        self.zero_means = zero_means  # an int 0 is accepted, meaning this (Composer's eval_interval: 0 is "never")
        spelled = ', '.join(f'10{u}' for u in self.units)
        self.what = f'a positive time such as {spelled} (or an int number of epochs)'

    def accepts(self, value: Any) -> bool:
        if self.zero_means is not None and value == 0 and is_int(value):
            return True
        time = parse_time(value)
        return time is not None and time[1] in self.units and time[0] > 0


class Size(Kind):
    """A positive integer, or a string Streaming reads as a size (``'10k'``, ``'10gb'``)."""

    what = 'a positive integer or a size string'

    def accepts(self, value: Any) -> bool:
        return (is_int(value) and value > 0) or (isinstance(value, str) and value != '')


class ListOf(Kind):
    """A list of values of ``item``, of ``length`` entries if given."""

    def __init__(self, item: Kind, length: Optional[int] = None, what: Optional[str] = None) -> None:
        self.item, self.length = item, length
        self.what = what or (f'a list of {length} ({item.what})' if length else f'a list of {item.what}')

    def accepts(self, value: Any) -> bool:
        return (isinstance(value, (list, tuple)) and (self.length is None or len(value) == self.length)
                and all(self.item.accepts(v) for v in value))


class AnyOf(Kind):
    """Any value one of ``kinds`` accepts."""

    def __init__(self, *kinds: Kind, what: Optional[str] = None) -> None:
        self.kinds = kinds
        self.what = what or ' or '.join(k.what for k in kinds)

    def accepts(self, value: Any) -> bool:
        return any(k.accepts(value) for k in self.kinds)

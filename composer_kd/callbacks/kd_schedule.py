"""``KDSchedule``: alpha and temperature of the distillation loss scheduled over training.

```yaml
callbacks:
  kd_schedule:
    alpha: {schedule: linear, start: 0.9, end: 0.1}                  # over the whole run (max_duration)
    temperature: {schedule: cosine, start: 4.0, end: 1.0, duration: 500ba}   # then held at `end`
```

Each value is a function of the run's elapsed time only, set at every batch (and before every evaluation), so a
resumed run continues the schedule where it stopped without any state of its own. The current values are logged
as ``kd/alpha`` and ``kd/temperature``; the loss and the ``TeacherDivergenceLoss`` metric read them.
"""

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from composer.core import Callback, State, Time, TimeUnit
from composer.loggers import Logger

from composer_kd.callbacks.unwrap import composer_model

__all__ = ['KDSchedule', 'Schedule', 'parse_schedule', 'scheduled_value']

SCHEDULES = ('constant', 'linear', 'cosine')
_BOUNDS = {'alpha': (0.0, 1.0, True), 'temperature': (0.0, math.inf, False)}  # low, high, low inclusive


def scheduled_value(schedule: str, start: float, end: float, fraction: float) -> float:
    """The value at ``fraction`` ∈ [0, 1] of the schedule: ``start`` (constant), or from ``start`` to ``end``
    linearly or along a half cosine; held at ``end`` past 1."""
    fraction = min(max(fraction, 0.0), 1.0)
    if schedule == 'constant':
        return start
    if schedule == 'linear':
        return start + (end - start) * fraction
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * fraction))


@dataclass(frozen=True)
class Schedule:
    schedule: str
    start: float
    end: float
    duration: Optional[Time]  # None: the run's max_duration


def parse_schedule(name: str, spec: Any) -> Schedule:
    """``{schedule, start, end, duration}`` → ``Schedule``.

    Raises:
        ValueError: naming ``name.key`` and the value.
    """
    if not isinstance(spec, Mapping):
        raise ValueError(f'{name} must be a mapping {{schedule, start, end, duration}}, got {spec!r}')
    unknown = sorted(set(spec) - {'schedule', 'start', 'end', 'duration'})
    if unknown:
        raise ValueError(f'unknown key {name}.{unknown[0]}; allowed: [duration, end, schedule, start]')
    kind = spec.get('schedule', 'linear')
    if kind not in SCHEDULES:
        raise ValueError(f'{name}.schedule={kind!r}: use one of {list(SCHEDULES)}')
    low, high, inclusive = _BOUNDS[name]
    values = {}
    for key in ('start', 'end'):
        value = spec.get(key, spec.get('start') if key == 'end' else None)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value <= high and (
            value >= low if inclusive else value > low)
        if not ok:
            raise ValueError(f'{name}.{key} must be a number in {"[" if inclusive else "("}{low:g}, {high:g}], '
                             f'got {value!r}')
        values[key] = float(value)
    duration = spec.get('duration')
    if duration is not None:
        try:
            duration = Time.from_timestring(str(duration))
        except (ValueError, TypeError):
            raise ValueError(f'{name}.duration={duration!r}: use a Composer time string (e.g. 500ba, 1ep)') from None
        if duration.value <= 0 or duration.unit not in (TimeUnit.BATCH, TimeUnit.EPOCH, TimeUnit.TOKEN,
                                                        TimeUnit.SAMPLE):
            raise ValueError(f'{name}.duration={spec["duration"]!r} must be a positive number of ba, ep, tok or sp')
    return Schedule(kind, values['start'], values['end'], duration)


class KDSchedule(Callback):
    """Sets ``alpha`` and/or ``temperature`` of the ``DistillationModel`` from schedules (see the module).

    Args:
        alpha (Mapping, optional): ``{schedule: constant|linear|cosine, start, end, duration}`` for alpha.
        temperature (Mapping, optional): the same for the temperature.
    """

    def __init__(self, alpha: Optional[Mapping[str, Any]] = None,
                 temperature: Optional[Mapping[str, Any]] = None) -> None:
        self.schedules = {name: parse_schedule(name, spec)
                          for name, spec in (('alpha', alpha), ('temperature', temperature)) if spec is not None}
        if not self.schedules:
            raise ValueError('alpha, temperature: give at least one schedule')

    def _fraction(self, state: State, schedule: Schedule) -> float:
        if schedule.duration is None:
            elapsed = state.get_elapsed_duration()
            return 0.0 if elapsed is None else float(elapsed.value)
        return state.timestamp.get(schedule.duration.unit).value / schedule.duration.value

    def _apply(self, state: State, logger: Logger) -> None:
        model = composer_model(state)
        values = {}
        for name, schedule in self.schedules.items():
            values[name] = scheduled_value(schedule.schedule, schedule.start, schedule.end,
                                           self._fraction(state, schedule))
        model.set_loss_settings(**values)
        if 'temperature' in values:  # Composer evaluates on copies of the model's metrics
            for metrics in state.eval_metrics.values():
                for metric in metrics.values():
                    if 'temperature' in getattr(metric, 'loss_kwargs', {}):
                        metric.loss_kwargs['temperature'] = values['temperature']
        logger.log_metrics({f'kd/{name}': value for name, value in values.items()})

    def fit_start(self, state: State, logger: Logger) -> None:
        self._apply(state, logger)

    def batch_start(self, state: State, logger: Logger) -> None:
        self._apply(state, logger)

    def eval_start(self, state: State, logger: Logger) -> None:
        self._apply(state, logger)

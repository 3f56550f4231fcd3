"""A half-life given as a share of the whole run: the normalization by total iterations."""

from __future__ import annotations

import dataclasses
from typing import Any

from ema_jax import _validate
from ema_jax.schedules._base import Scalar
from ema_jax.schedules._base import Schedule
from ema_jax.schedules._base import half_life_alpha
from ema_jax.schedules._base import register
from ema_jax.schedules._base import steps_since_update


@register
@dataclasses.dataclass(frozen=True, kw_only=True)
class FractionOfTraining(Schedule):
    r"""An EMA whose half-life is a fixed share of the run, whatever its batch and length.

    pycls's rule holds the half-life at about ``ln 2 / (ema_alpha * dataset_size)`` of
    training; pycls issue 168 proposed normalizing by the total iterations instead, so
    that the dataset size drops out. Here the user says it directly: the half-life is
    ``halflife_fraction * total_steps`` optimizer steps, and each update, ``dt`` steps
    after the previous one, uses exactly

    .. math::
      \alpha = 1 - 0.5^{\Delta t / (\text{halflife\_fraction}\cdot\text{total\_steps})}

    (no linearisation, no clamp). Updates come every ``update_period`` calls.

    Args:
      halflife_fraction: the half-life as a share of training, in (0, 1].
      total_steps: optimizer steps in the run (>= 1).
      update_period: update every this many calls (>= 1).

    Example:
      >>> from ema_jax import schedules
      >>> s = schedules.fraction_of_training(halflife_fraction=0.05, total_steps=10_000)
      >>> round(s.alpha_at(0) * 500, 4)  # ~ ln 2 per half-life of 500 steps
      0.6927
    """

    name = "fraction_of_training"
    halflife_fraction: float
    total_steps: int
    update_period: int = 1

    def __post_init__(self) -> None:
        s = object.__setattr__
        v = _validate
        fraction = v.check_real_in("halflife_fraction", self.halflife_fraction, "(0, 1]")
        s(self, "halflife_fraction", fraction)
        s(self, "total_steps", v.check_positive_int("total_steps", self.total_steps))
        super().__post_init__()  # update_period

    def step_size(self, i: Scalar, xp: Any) -> Any:
        dt = steps_since_update(i, self.update_period, xp)
        return half_life_alpha(dt, self.halflife_fraction * self.total_steps, xp)

    def steps_in_run(self) -> int | None:
        return self.total_steps

    @classmethod
    def example(cls) -> FractionOfTraining:
        return cls(halflife_fraction=0.05, total_steps=5000)


fraction_of_training = FractionOfTraining

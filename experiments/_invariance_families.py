"""The EMA families the invariance sweep compares, each a knob, a grid and a builder.

A *family* is one way a user sets the EMA once and reuses it when the batch size and
the schedule length change: pycls's ``ema_alpha`` (linear and exact rules), a fixed
per-step decay, EDM2's ``sigma_rel``, EDM's half-life in samples, a half-life as a
share of training, and BEMA's ``ema_power``. Adding a family is one ``Family`` in
``FAMILIES``: the training loop, the analysis, the plot and the doc iterate it.

Every family's grid spans the same range of horizons, from about one step to longer
than training, log-spaced a quarter decade apart (BEMA's exponent linearly), so that
no family's optimum sits at the edge of its grid (the doc's tables show where each
family's best settings fall).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import ema_jax
from ema_jax import schedules


@dataclasses.dataclass(frozen=True)
class Context:
    """What a family may read of one run to build its average."""

    batch_size: int
    epochs: int
    steps_per_epoch: int
    warmup_epochs: int
    update_period: int

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch


@dataclasses.dataclass(frozen=True)
class Family:
    """A family: its name, the knob's label, its grid (full, quick) and its builder.

    ``build(value, context)`` returns a ``schedules.Schedule`` (kept with the others in
    one ``ema_jax.ema``) or a whole transform (``ema_jax.bema``: its own state).
    """

    name: str
    label: str
    grid: tuple[float, ...]
    quick_grid: tuple[float, ...]
    build: Callable[[float, Context], Any]
    log_scale: bool = True

    def setting(self, value: float) -> str:
        """The column name of one setting, ``family:value``."""
        return f"{self.name}:{value:.6g}"


def _decades(lo: float, hi: float, step: float) -> tuple[float, ...]:
    """10**lo, 10**(lo + step), ..., 10**hi."""
    count = round((hi - lo) / step) + 1
    return tuple(10.0 ** (lo + step * i) for i in range(count))


def _pycls(rule: str) -> Callable[[float, Context], Any]:
    def build(value: float, c: Context) -> Any:
        return schedules.pycls(
            ema_alpha=value,
            batch_size=c.batch_size,
            max_epoch=c.epochs,
            update_period=c.update_period,
            warmup_epochs=c.warmup_epochs,
            steps_per_epoch=c.steps_per_epoch,
            rule=rule,
        )

    return build


def _constant(value: float, c: Context) -> Any:
    return schedules.constant(1.0 - value, update_period=c.update_period)


def _power_function(value: float, c: Context) -> Any:
    return schedules.power_function(
        sigma_rel=value, batch_size=c.batch_size, update_period=c.update_period
    )


def _halflife(value: float, c: Context) -> Any:
    return schedules.halflife(
        halflife_samples=value, batch_size=c.batch_size, update_period=c.update_period
    )


def _fraction(value: float, c: Context) -> Any:
    return schedules.fraction_of_training(
        halflife_fraction=value, total_steps=c.total_steps, update_period=c.update_period
    )


def _bema(value: float, c: Context) -> Any:
    # TRL's defaults but the exponent; the snapshot (theta0, the EMA's start) is the
    # weights after the warmup epochs, as pycls's EMA copies them through warmup.
    return ema_jax.bema(
        ema_power=value,
        update_period=c.update_period,
        update_after=c.warmup_epochs * c.steps_per_epoch,
    )


# sigma_rel below ~0.29 (gamma > 0); EDM2's 0.05 and 0.10 are inside.
_SIGMA_REL = (*_decades(-2.5, -0.75, 0.25), 0.25)
_BEMA_POWERS = tuple(round(0.2 + 0.1 * i, 1) for i in range(9))

FAMILIES: tuple[Family, ...] = (
    Family(
        "linear",
        "ema_alpha (pycls)",
        _decades(-3.5, -0.5, 0.25),
        _decades(-3.5, -0.5, 0.5),
        _pycls("linear"),
    ),
    Family(
        "exact",
        "ema_alpha (pycls, exact)",
        _decades(-3.5, -0.5, 0.25),
        _decades(-3.5, -0.5, 0.5),
        _pycls("exact"),
    ),
    Family(
        "constant",
        "1 - decay (per step)",
        _decades(-3.5, -0.5, 0.25),
        _decades(-3.5, -0.5, 0.5),
        _constant,
    ),
    Family(
        "power_function",
        "sigma_rel (EDM2)",
        _SIGMA_REL,
        (_SIGMA_REL[0], _SIGMA_REL[2], _SIGMA_REL[4], _SIGMA_REL[6], _SIGMA_REL[8]),
        _power_function,
    ),
    Family(
        "halflife",
        "half-life (samples, EDM)",
        _decades(1.5, 4.75, 0.25),
        _decades(1.5, 4.5, 0.5),
        _halflife,
    ),
    Family(
        "fraction_of_training",
        "half-life (share of training)",
        _decades(-2.75, 0.0, 0.25),
        _decades(-2.5, 0.0, 0.5),
        _fraction,
    ),
    Family(
        "bema",
        "ema_power (BEMA)",
        _BEMA_POWERS,
        (0.2, 0.4, 0.6, 0.8, 1.0),
        _bema,
        log_scale=False,
    ),
)

BY_NAME = {f.name: f for f in FAMILIES}


def grid(family: Family, quick: bool) -> tuple[float, ...]:
    return family.quick_grid if quick else family.grid


def build_all(context: Context, quick: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every family's averages of one run: ``(schedules, transforms)``, keyed by column name.

    Schedules go into one ``ema_jax.ema`` (a trailing axis of averages); transforms
    (BEMA) each keep their own state. Column order: schedules, then transforms.
    """
    scheduled: dict[str, Any] = {}
    transforms: dict[str, Any] = {}
    for family in FAMILIES:
        for value in grid(family, quick):
            built = family.build(value, context)
            target = scheduled if isinstance(built, schedules.Schedule) else transforms
            target[family.setting(value)] = built
    return scheduled, transforms


def half_life_fraction(average: Any, context: Context) -> float | None:
    """The average's half-life at the end, as a share of training (``ema_jax.explain``)."""
    # A pycls schedule knows its own length (max_epoch x steps_per_epoch).
    known = isinstance(average, schedules.Pycls)
    report = ema_jax.explain(average, **({} if known else {"total_steps": context.total_steps}))
    value = report.half_life_fraction
    return None if value is None or not math.isfinite(value) else float(value)

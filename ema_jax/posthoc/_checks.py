"""What makes a reconstruction trustworthy: one run's snapshots, and a target they reach.

A reconstruction is only as good as the least-squares fit of its profile
(``Coefficients.residual``, the relative L2 error of the reconstructed weighting over
time). A width 2.5% wider than 0.07 has a profile 0.02 away in that norm, one 13% wider 0.1
(docs/posthoc.md, the ``thresholds`` table), so:

- residual <= :data:`WARN_RESIDUAL`: the reconstruction is the target's (silent);
- up to :data:`MAX_RESIDUAL`: a :class:`ExtrapolationWarning` with the residual and a
  tracker set that reaches the target;
- above: an :class:`ExtrapolationError` (a warning with ``allow_extrapolation=True``):
  the result would be the average of some other width.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import numpy as np

from ema_jax.posthoc import _math
from ema_jax.posthoc._format import POSTHOC_KEY
from ema_jax.posthoc._format import SnapshotMismatchError
from ema_jax.schedules import _edm

WARN_RESIDUAL = 0.02  # the profile distance of a width 2.5% away (at 0.07)
MAX_RESIDUAL = 0.1  # that of a width 13% away: another width's average
SETTINGS = ("gamma", "batch_size", "update_period")  # what fixes an average's profile


class ExtrapolationWarning(UserWarning):
    """A reconstruction whose profile misses the target's by more than WARN_RESIDUAL."""

    __module__ = "ema_jax.posthoc"


class ExtrapolationError(ValueError):
    """A reconstruction whose profile misses the target's by more than MAX_RESIDUAL."""

    __module__ = "ema_jax.posthoc"


def settings(record: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``{average name: {"gamma", "batch_size", "update_period"}}`` of a snapshot's record."""
    return {
        str(a["name"]): {key: a.get(key) for key in SETTINGS}
        for a in record[POSTHOC_KEY]["averages"]
    }


def settings_difference(
    one: Mapping[str, Mapping[str, Any]], other: Mapping[str, Mapping[str, Any]]
) -> str | None:
    """The first difference between two snapshots' settings, in words; None if alike."""
    if sorted(one) != sorted(other):
        return f"averages {sorted(one)} vs {sorted(other)}"
    for name in one:
        for key in SETTINGS:
            a, b = one[name][key], other[name][key]
            if a != b and not (
                isinstance(a, float) and isinstance(b, float) and math.isclose(a, b)
            ):
                return f"average {name!r} has {key} {a!r} vs {b!r}"
    return None


def check_one_run(
    directory: Any, steps: Sequence[int], records: Sequence[Mapping[str, Any]]
) -> None:
    """Refuses snapshots whose averages were saved with other settings than the newest's.

    Raises:
      SnapshotMismatchError: naming the steps that differ from the newest snapshot and
        the first difference (batch size, exponents, update period, averages).
    """
    newest = settings(records[-1])
    odd = [
        (s, settings_difference(settings(r), newest)) for s, r in zip(steps, records, strict=True)
    ]
    odd = [(s, why) for s, why in odd if why is not None]
    if odd:
        listed = [s for s, _ in odd]
        raise SnapshotMismatchError(
            f"the snapshots in {directory} are of two runs with other settings: steps"
            f" {listed} differ from step {steps[-1]} ({odd[0][1]} at step {odd[0][0]} vs"
            f" step {steps[-1]}); keep one run's snapshots per directory (move the others"
            " away)"
        )


def suggest(tracked: Sequence[float], times: Sequence[float], time: float, sigma_rel: float) -> str:
    """Trackers that span ``sigma_rel``, with the residual they would give at these times."""
    top = 0.99 * _edm.SIGMA_REL_OF_GAMMA_0
    low = min(min(tracked), sigma_rel / 1.25)
    high = max(max(tracked), min(sigma_rel * 1.25, top))
    pair = (float(f"{low:.3g}"), float(f"{high:.3g}"))
    more = ", and save more snapshots (a smaller snapshot_every)"
    if pair[0] >= min(tracked) and pair[1] <= max(tracked):  # within the tracked widths
        return "save more snapshots (a smaller snapshot_every): the residual falls about as 1/N**2"
    gammas = [_math.gamma_of(s) for s in pair for _ in times]
    solution = _math.solve(list(times) * 2, gammas, time=time, gamma=_math.gamma_of(sigma_rel))
    text = (
        f"track widths that span it, e.g. posthoc.trackers({pair}) (residual"
        f" {solution.residual:.2g} with these snapshot steps)"
    )
    if len(times) < 2 or solution.residual > WARN_RESIDUAL:
        text += more
    return text


def check_residual(
    coefficients: Any,
    tracked: Sequence[float],
    times: Sequence[float],
    *,
    allow_extrapolation: bool,
    stacklevel: int = 3,
) -> None:
    """Warns or raises when a reconstruction's residual says it misses its target.

    Raises:
      ExtrapolationError: a residual above MAX_RESIDUAL without ``allow_extrapolation``.
    """
    c = coefficients
    if c.residual <= WARN_RESIDUAL:
        return
    source = "a single snapshot" if len(times) < 2 else f"{len(times)} snapshots"
    message = (
        f"sigma_rel={c.sigma_rel:g} is reconstructed at step {c.step} from {source} of"
        f" sigma_rel {', '.join(f'{s:g}' for s in sorted(tracked))} with residual"
        f" {c.residual:.2g} (the relative L2 error of its profile; above {WARN_RESIDUAL:g} it"
        " is farther from the target than a width 2.5% wider is):"
        f" {suggest(tracked, times, c.time, c.sigma_rel)}"
    )
    if c.residual > MAX_RESIDUAL and not allow_extrapolation:
        raise ExtrapolationError(
            message
            + f"; allow_extrapolation=True returns it anyway (residual above {MAX_RESIDUAL:g})"
        )
    warnings.warn(message, ExtrapolationWarning, stacklevel=stacklevel)


def snapshot_times(infos: Sequence[Any]) -> list[float]:
    """Each snapshot's time (its averages' latest update, in samples)."""
    return [float(np.max([a.time for a in info.averages])) for info in infos]

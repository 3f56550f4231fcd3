"""Argument checks shared by every public entry point: pure Python, no JAX.

Each check returns the value as a plain Python number (or dtype) or raises
``ValueError`` naming the argument and the value, so that a bad hyperparameter never
surfaces as a tracing error.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import ml_dtypes
import numpy as np

INT32_MAX = 2**31 - 1
DTYPE_ALIASES = {"fp64": "float64", "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _plain(value: numbers.Real) -> float:
    """A NumPy scalar as the Python int or float of the same value."""
    return int(value) if isinstance(value, numbers.Integral) else float(value)


def check_nonnegative_real(name: str, value: Any) -> float:
    """Returns ``value`` as a Python number, or raises if it is not finite and >= 0."""
    if not _is_real(value) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return _plain(value)


def check_positive_real(name: str, value: Any) -> float:
    """Returns ``value`` as a Python number, or raises if it is not finite and > 0."""
    if not _is_real(value) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return _plain(value)


def check_real_in(name: str, value: Any, interval: str) -> float:
    """Returns ``value`` as a float, or raises if it is not in ``interval``.

    ``interval`` is written as in the error message: "[0, 1)", "(0, 1]", "[0, 1]".
    """
    lo, hi = (float(bound) for bound in interval[1:-1].split(","))
    ok = _is_real(value) and math.isfinite(value)
    if ok:
        ok = (value >= lo if interval[0] == "[" else value > lo) and (
            value <= hi if interval[-1] == "]" else value < hi
        )
    if not ok:
        raise ValueError(f"{name} must be a number in {interval}, got {value!r}")
    return float(value)


def check_nonnegative_int(name: str, value: Any) -> int:
    """Returns ``value`` as an int, or raises if it is not an integer in [0, 2**31)."""
    if not _is_int(value) or not 0 <= value <= INT32_MAX:
        raise ValueError(f"{name} must be an integer in [0, 2**31 - 1], got {value!r}")
    return int(value)


def check_positive_int(name: str, value: Any) -> int:
    """Returns ``value`` as an int, or raises if it is not an integer in [1, 2**31)."""
    if not _is_int(value) or not 1 <= value <= INT32_MAX:
        raise ValueError(f"{name} must be an integer in [1, 2**31 - 1], got {value!r}")
    return int(value)


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {value!r}")
    return value


def check_alpha(alpha: float, where: str) -> float:
    """A resolved step size must be a finite number in [0, 1]; ``where`` names its inputs."""
    if not (math.isfinite(alpha) and 0.0 <= alpha <= 1.0):
        raise ValueError(
            f"{where} give a step size alpha={alpha!r}, which is not a number in [0, 1]"
        )
    return alpha


def resolve_dtype(dtype: Any, name: str = "dtype") -> np.dtype:
    """``dtype`` (a name such as "bfloat16" or "bf16", a NumPy/JAX dtype) as a NumPy dtype.

    Raises ``ValueError`` naming ``name`` unless it is a floating dtype.
    """
    if isinstance(dtype, str):
        dtype = DTYPE_ALIASES.get(dtype, dtype)
        if isinstance(getattr(ml_dtypes, dtype, None), type):
            dtype = getattr(ml_dtypes, dtype)
    try:
        resolved = np.dtype(getattr(dtype, "dtype", dtype))
        ml_dtypes.finfo(resolved)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a floating dtype, got {dtype!r}") from None
    if resolved.kind == "c":
        raise ValueError(f"{name} must be a real floating dtype, got {dtype!r}")
    return resolved


STALL_GAP = 1.0  # alpha < eps / 2: a step must exceed the EMA's own size to register


class EmaPrecisionWarning(UserWarning):
    """An EMA whose dtype rounds its updates away (round-to-nearest at a tiny step size)."""


def rounding_gap(alpha: float, dtype: Any) -> float:
    """``eps / (2 * alpha)``: the relative gap ``|params - ema| / |ema|`` an update needs.

    With round-to-nearest, an update registers when the gap exceeds this, and always
    rounds away below half of it: ``alpha * |params - ema|`` is then under half a unit
    in the last place of ``ema``. The criterion of :func:`ema_jax.explain`'s dtype check.

    Example:
      >>> round(rounding_gap(1e-4, "bfloat16"), 2)  # decay 0.9999: a 39x gap to move
      39.06
    """
    eps = float(ml_dtypes.finfo(resolve_dtype(dtype)).eps)
    return math.inf if alpha <= 0 else eps / (2.0 * alpha)


def smallest_alpha(schedules: Any) -> float | None:
    """The smallest step size ``schedules`` use: each one's constant one, or its last.

    None when none of them knows it (a changing step size and no run length).
    """
    alphas = []
    for s in schedules:
        alpha = s.static_alpha
        total, period = s.steps_in_run(), s.update_period
        if alpha is None and total and period:
            alpha = s.alpha_at((total - 1) // period * period)
        if alpha:
            alphas.append(alpha)
    return min(alphas) if alphas else None


def stall_message(schedules: Any, dtypes: list[np.dtype]) -> str | None:
    """The warning for EMA leaves of ``dtypes`` under round-to-nearest, or None if they move.

    ``alpha`` is the schedules' smallest step size (:func:`smallest_alpha`). The
    threshold is ``alpha < eps / 2`` (a gap above 1): weights would have to differ from
    their EMA by more than its own size for an update to register, so the EMA cannot
    move. (:func:`ema_jax.explain` already notes gaps above 5%.)
    """
    alpha = smallest_alpha(schedules)
    if alpha is None or not 0 < alpha < 1:
        return None
    stalled = sorted({d.name for d in dtypes if rounding_gap(alpha, d) > STALL_GAP})
    if not stalled:
        return None
    gap = max(rounding_gap(alpha, d) for d in dtypes)
    narrow = all(np.dtype(d).itemsize < 4 for d in dtypes if np.dtype(d).name in stalled)
    fix = (
        "keep the EMA in float32 (ema_dtype=jnp.float32), or round stochastically"
        " (rounding='stochastic'), which keeps a low-precision EMA unbiased"
        if narrow
        else "keep the EMA in a wider dtype (ema_dtype), or raise update_period"
    )
    return (
        f"an EMA in {', '.join(stalled)} with round-to-nearest at step size alpha={alpha:.3g}"
        f" only moves where |params - ema| > {gap:.3g} * |ema|; below half that every update"
        f" rounds away, so the EMA cannot move: {fix}"
    )

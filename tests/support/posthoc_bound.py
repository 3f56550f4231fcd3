"""The tolerance of a post-hoc reconstruction against an average tracked directly.

Derivation. Let theta_c be the parameters after update call c (``trajectory[c + 1]``).
A power-function average read after ``step`` calls is exactly (in real arithmetic)
``sum_c w(c) theta_c`` over its update calls c < step, with the weights of
``anchors.power_function_weights`` (tests/test_schedules.py pins this). A
reconstruction with coefficients x_i (summing to 1) over snapshot averages A_i, and the
target average T read at the reconstruction step, differ by

  sum_i x_i A_i - T = sum_c r(c) theta_c            (exact averages)
                    + sum_i x_i (A_i~ - A_i)        (the snapshots' rounding)
                    - (T~ - T)                      (the tracked average's rounding)
                    + the final cast of the sum to float32,

with the residual weighting r(c) = sum_i x_i w_i(c) - w_T(c). Because sum_c r(c) =
sum_i x_i - 1 = 0, any constant can be subtracted from theta: per coordinate,
``|sum_c r(c) theta_c| <= ||r||_1 * (max_c theta_c - min_c theta_c) / 2``
(plus ``|sum_c r(c)| * max|theta|`` for the rounding of sum x_i = 1). ``r`` is the
continuous profile residual that the least squares minimises, integrated over each
update's interval, so ``||r||_1`` is at most the L1 distance of the profiles.

Rounding of one float32 average, every update ``e <- e + alpha (p - e)``: with alpha
computed to 8 ulps (float32 log1p/expm1), the subtraction and product rounded once each
and the sum rounded once, the error E obeys
``|E'| <= (1 - alpha)|E| + alpha * 2S * 10u + u S`` (S = max |theta| over the run,
u = 2**-24), and unrolling it with the damping ``D_j = prod_{l > j}(1 - alpha_l) =
(t_j / t_n)**(gamma + 1)`` (so that ``alpha_j D_j = w_j`` sums to 1) gives
``|E_n| <= u S (20 + sum_j D_j)``. A snapshot stored in a narrower dtype adds
``u_store * S`` (round to nearest), and the final cast ``u * |result|``.
"""

from __future__ import annotations

import numpy as np

from ema_jax import posthoc
from ema_jax.schedules import PowerFunction
from support import anchors

U32 = 2.0**-24
UNIT_ROUNDOFF = {None: 0.0, "float32": 0.0, "bfloat16": 2.0**-8, "float16": 2.0**-11}


def update_calls(schedule: PowerFunction, step: int) -> np.ndarray:
    """The calls below ``step`` at which the schedule updates (asked of the schedule itself)."""
    return np.array([i for i in range(step) if schedule.alpha_at(i) is not None])


def weights(schedule: PowerFunction, step: int) -> tuple[np.ndarray, np.ndarray]:
    """``(calls, w)``: the realised power-function weights after ``step`` calls, float64."""
    calls = update_calls(schedule, step)
    return calls, anchors.power_function_weights(
        (calls + 1.0) * schedule.batch_size, schedule.exponent
    )


def exact_average(trajectory: np.ndarray, schedule: PowerFunction, step: int) -> np.ndarray:
    """The average in float64: ``trajectory[c + 1]`` is theta after call c (rows: steps)."""
    calls, w = weights(schedule, step)
    return w @ trajectory[calls + 1]


def rounding_bound(schedule: PowerFunction, step: int, sup: np.ndarray) -> np.ndarray:
    """``u S (20 + sum_j D_j)``: the float32 average's error bound (see the docstring)."""
    calls = update_calls(schedule, step)
    times = (calls + 1.0) * schedule.batch_size
    damping = (times / times[-1]) ** (schedule.exponent + 1.0)
    return U32 * sup * (20.0 + damping.sum())


def residual_weights(
    coefficients: posthoc.Coefficients,
    schedules: dict[str, PowerFunction],
    target: PowerFunction,
) -> np.ndarray:
    """``r(c)`` over calls ``c < coefficients.step``, float64."""
    r = np.zeros(coefficients.step)
    for (step, name), x in zip(coefficients.sources, coefficients.weights, strict=True):
        calls, w = weights(schedules[name], step)
        r[calls] += x * w
    calls, w = weights(target, coefficients.step)
    r[calls] -= w
    return r


def tolerance(
    coefficients: posthoc.Coefficients,
    schedules: dict[str, PowerFunction],
    target: PowerFunction,
    trajectory: np.ndarray,
    result: np.ndarray,
    storage: str | None = None,
) -> tuple[np.ndarray, float]:
    """The per-coordinate bound on ``|reconstruction - tracked average|``, and ``||r||_1``.

    ``trajectory``: float64, shape (calls + 1, coordinates), ``trajectory[c + 1]``
    after call c; ``result``: the reconstruction, flattened the same way.
    """
    step = coefficients.step
    rows = trajectory[1 : step + 1]
    r = residual_weights(coefficients, schedules, target)
    sup = np.max(np.abs(rows), axis=0)
    half_range = (rows.max(axis=0) - rows.min(axis=0)) / 2
    method = np.abs(r).sum() * half_range + abs(r.sum()) * sup
    snapshots = sum(
        abs(x) * (rounding_bound(schedules[name], s, sup) + UNIT_ROUNDOFF[storage] * sup)
        for (s, name), x in zip(coefficients.sources, coefficients.weights, strict=True)
    )
    tracked = rounding_bound(target, step, sup)
    return method + snapshots + tracked + U32 * np.abs(result), float(np.abs(r).sum())

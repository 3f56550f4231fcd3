"""What any schedule means over a run: its step sizes, half-lives and warnings.

Host-side float64 NumPy over the schedule's own formulas (``Schedule.step_size``), the
same ones the jitted update evaluates; pycls's own report is :mod:`ema_jax._report`,
and :func:`ema_jax.explain` (``ema_jax/_explain.py``) the front door to both.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import ml_dtypes
import numpy as np

from ema_jax import _validate
from ema_jax._report_text import Report
from ema_jax._report_text import format_schedule_report
from ema_jax.schedules import Constant
from ema_jax.schedules import Schedule

MAX_CALLS = 4_000_000  # calls scanned for the cadence; beyond, multiples of update_period
MAX_UPDATES = 5_000_000  # beyond this many updates, the whole-run sums are not computed
DTYPE_GAP_TOLERANCE = 0.05
BIAS_TOLERANCE = 1e-3
DEFAULT_HORIZON = 1_000_000  # the curve's last step when the run length is unknown

WARN_COPIES = "copy: every update of the {total}-step run copies the weights: the EMA is no average"
WARN_HALF_LIFE = (
    "half-life: the final EMA still holds {start:.1%} of the weights it started averaging"
    " from: the EMA is longer than the run"
)
WARN_DTYPE = (
    "dtype: with alpha {alpha:.3g} at the end and {dtype}'s resolution eps/2 = {half_eps:.3g},"
    " updates can round away unless |params - ema| > {gap:.3g} * |ema|; keep the EMA in"
    " float32 (ema_dtype), round stochastically (rounding='stochastic', unbiased in"
    " bfloat16/float16), or raise update_period"
)
WARN_BIAS = (
    "bias: decay * ema + (1 - decay) * params rounds decay and 1 - decay separately in"
    " {ct}, so the average settles at {ratio:.6g} times a constant parameter ({bias:+.3%});"
    " nnx.EMA and optax do the same; an ema_dtype of float64 or schedules.fraction_of_training"
    " avoid it"
)


@dataclasses.dataclass(frozen=True)
class ScheduleReport(Report):
    """What a schedule means over a run: the :class:`Report` of any schedule but pycls.

    ``str(report)`` is a table for people, ``report.to_dict()`` a JSON-ready dict.
    "At the end" is the last update of the run (of ``total_steps`` optimizer steps);
    without a run length those fields are None. Half-lives are of the step size at
    that update: ``ln 2 / -ln(1 - alpha)`` updates.
    """

    schedule: str
    settings: dict[str, Any]
    dtype: str
    batch_size: float | None
    total_steps: int | None
    update_period: int
    updates_total: int | None
    copy_updates: int | None
    """Updates in the run that copy the weights (warmup)."""
    curve: tuple[tuple[int, float, float, float | None, float | None], ...]
    """Rows ``(step, alpha, half-life in steps, in samples, as a share of training)``."""
    alpha_end: float | None
    half_life_updates: float | None
    half_life_steps: float | None
    half_life_samples: float | None
    half_life_fraction: float | None
    start_weight_at_end: float | None
    """The share of the final EMA that is still the weights of its last copy."""
    fixed_point_bias: float | None
    """constant(decay): where the average of a constant parameter settles, relative, - 1."""
    dtype_eps: float
    min_registered_gap: float | None
    warnings: tuple[str, ...]

    def __str__(self) -> str:
        return format_schedule_report(self)


def _half_life(alpha: float) -> float:
    if alpha <= 0.0:
        return math.inf
    return 0.0 if alpha >= 1.0 else math.log(2.0) / -math.log1p(-alpha)


def _curve_steps(total: int, k: int) -> list[int]:
    """Steps to tabulate: 0, 1, 2, 5, 10, ... and 10%, 25%, 50% and the end, on updates."""
    steps = {int(m * 10**e) for e in range(10) for m in (1, 2, 5)} | {0}
    steps |= {int(f * total) for f in (0.1, 0.25, 0.5)} | {total - 1}
    on_updates = {-(-s // k) * k for s in steps if s < total}
    return sorted(s for s in on_updates if s < total)


def _update_calls(schedule: Schedule, total: int) -> tuple[int, int | None, np.ndarray | None]:
    """How many of the calls below ``total`` update, the last one, and all of them.

    By the schedule's own ``updates_at`` (a family may update off the multiples of
    ``update_period``: BEMA from its ``update_after`` on) up to ``MAX_CALLS`` calls;
    beyond, the multiples of ``update_period`` stand in, counted without listing them
    (the list is None: a run of 2**31 steps is not an array of 2**31 calls).
    """
    k = schedule.update_period
    if total > MAX_CALLS:
        count = -(-total // k)
        return count, (count - 1) * k, None
    calls = np.arange(total, dtype=np.int64)
    calls = calls[np.broadcast_to(np.asarray(schedule.updates_at(calls), bool), calls.shape)]
    return int(calls.size), (int(calls[-1]) if calls.size else None), calls


def _alphas(schedule: Schedule, calls: np.ndarray) -> np.ndarray:
    """The step sizes of updates at ``calls`` (1.0 where they copy), float64."""
    with np.errstate(all="ignore"):
        alpha = np.broadcast_to(np.asarray(schedule.step_size(calls, np), np.float64), calls.shape)
    copies = np.broadcast_to(np.asarray(schedule.copies_at(calls, np), bool), calls.shape)
    return np.where(copies, 1.0, alpha)


def fixed_point_bias(schedule: Schedule, compute_dtype: np.dtype) -> float | None:
    """``fl(1 - decay) / (1 - fl(decay)) - 1`` for the two-weight blend, else None."""
    keep = schedule.keep_weight()
    if keep is None or compute_dtype == np.float64:
        return None
    new_weight = float(np.asarray(1.0 - keep, compute_dtype))
    gap = 1.0 - float(np.asarray(keep, compute_dtype))
    return new_weight / gap - 1.0 if gap > 0 else None


def explain_schedule(
    schedule: Schedule, *, total_steps: int | None = None, dtype: Any = "float32"
) -> ScheduleReport:
    """The report of any schedule; see :func:`ema_jax.explain`."""
    own = getattr(schedule, "total_steps", None)
    if total_steps is not None:
        total_steps = _validate.check_positive_int("total_steps", total_steps)
        if own is not None and own != total_steps:
            raise ValueError(
                f"total_steps={total_steps!r} differs from the schedule's own total_steps={own!r}"
            )
    total = total_steps if total_steps is not None else own
    resolved = _validate.resolve_dtype(dtype)
    eps = float(ml_dtypes.finfo(resolved).eps)
    k = schedule.update_period
    batch = getattr(schedule, "batch_size", None)

    horizon = total if total is not None else DEFAULT_HORIZON
    rows = []
    for step in _curve_steps(horizon, k):
        a = float(_alphas(schedule, np.array([step]))[0])
        h_steps = _half_life(a) * k
        samples = None if batch is None else h_steps * batch
        share = None if total is None else h_steps / total
        rows.append((step, a, h_steps, samples, share))

    n_updates = copies = None
    alpha_end = h_updates = h_steps_end = h_samples = share_end = start = gap = None
    if total is not None:
        n_updates, last, calls = _update_calls(schedule, total)
        if last is not None:
            alpha_end = float(_alphas(schedule, np.array([last]))[0])
            h_updates = _half_life(alpha_end)
            h_steps_end = h_updates * k
            h_samples = None if batch is None else h_steps_end * batch
            share_end = h_steps_end / total
            gap = eps / (2.0 * alpha_end) if alpha_end else math.inf
        if n_updates <= MAX_UPDATES:
            if calls is None:
                calls = np.arange(n_updates, dtype=np.int64) * k
            alphas = _alphas(schedule, calls)
            copied = np.flatnonzero(alphas == 1.0)
            copies = int(copied.size)
            after = alphas[copied[-1] + 1 :] if copied.size else alphas
            start = float(np.exp(np.sum(np.log1p(-after)))) if after.size else 0.0
    static = schedule.static_alpha
    if total is None and static is not None:  # the same step size at every update
        alpha_end, h_updates = static, _half_life(static)
        h_steps_end = h_updates * k
        h_samples = None if batch is None else h_steps_end * batch
        gap = eps / (2.0 * static) if static else math.inf
    compute = np.promote_types(resolved, np.float32)
    bias = fixed_point_bias(schedule, compute)

    warnings: list[str] = []
    if copies is not None and n_updates and copies == n_updates:
        warnings.append(WARN_COPIES.format(total=total))
    elif start is not None and start > 0.5:
        warnings.append(WARN_HALF_LIFE.format(start=start))
    if alpha_end and gap is not None and gap > DTYPE_GAP_TOLERANCE:
        warnings.append(
            WARN_DTYPE.format(alpha=alpha_end, dtype=resolved.name, half_eps=eps / 2, gap=gap)
        )
    if bias is not None and abs(bias) > BIAS_TOLERANCE:
        warnings.append(WARN_BIAS.format(ct=np.dtype(compute).name, ratio=1 + bias, bias=bias))

    return ScheduleReport(
        schedule=schedule.name,
        settings=schedule.settings(),
        dtype=resolved.name,
        batch_size=batch,
        total_steps=total,
        update_period=k,
        updates_total=n_updates,
        copy_updates=copies,
        curve=tuple(rows),
        alpha_end=alpha_end,
        half_life_updates=h_updates,
        half_life_steps=h_steps_end,
        half_life_samples=h_samples,
        half_life_fraction=share_end,
        start_weight_at_end=start,
        fixed_point_bias=bias if isinstance(schedule, Constant) else None,
        dtype_eps=eps,
        min_registered_gap=gap,
        warnings=tuple(warnings),
    )

"""The report of a pycls schedule: alphas, update counts, half-lives, warnings.

:func:`ema_jax.explain` (``ema_jax/_explain.py``) is the front door; this module
builds its :class:`EmaReport` for pycls's schedule.

Plain Python and NumPy, no JAX computations, so that the command line, notebooks and
logs can show the numbers before a training run is spent on them. The math is in
``docs/math.md``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any
from typing import Literal

import ml_dtypes

from ema_jax import _validate
from ema_jax._report_text import Report
from ema_jax._report_text import format_report
from ema_jax.schedules import Pycls
from ema_jax.schedules._pycls import alpha_exact
from ema_jax.schedules._pycls import alpha_linear

resolve_dtype = _validate.resolve_dtype
Cadence = Literal["epoch", "run"]
CADENCES: tuple[str, ...] = ("epoch", "run")
APPROX_TOLERANCE = 0.01  # warn when the linear alpha is off the exact one by more
CADENCE_TOLERANCE = 0.10  # warn when the per-epoch cadence speeds the EMA up by more
DTYPE_GAP_TOLERANCE = 0.05  # warn when updates need a larger relative gap to register

# Warnings start with a fixed tag, so that scripts (and tests) can pick them out.
WARN_OFF = "EMA off: {why}, so the EMA never averages"
WARN_APPROX = (
    "approximation: the linear alpha {linear:.6g} is {diff:.2%} above the exact"
    " {exact:.6g} (ema_alpha*batch_size*update_period/max_epoch = {x:.4g} is not small);"
    " rule='exact' has no such error"
)
WARN_CLAMP = (
    "clamp: ema_alpha*batch_size*update_period/max_epoch = {x:.4g} > 1 is clamped to"
    " alpha = 1, so every update copies the weights and the EMA is no average"
)
WARN_HALF_LIFE = (
    "half-life: the half-life ({half_life:.3g} epochs) exceeds the {after:.3g} epochs of"
    " training after warmup; the final EMA still holds {start:.1%} of the weights it"
    " started averaging from"
)
WARN_CADENCE = (
    "cadence: {per_epoch} updates per {spe}-step epoch, each meant for {k} steps, move the"
    " EMA {speedup:.1%} faster than intended (the cadence restarts every epoch); choose an"
    " update_period that divides steps_per_epoch"
)
WARN_WARMUP = (
    "warmup: warmup_epochs={warmup!r} covers the whole run (max_epoch={max_epoch!r}),"
    " so the EMA only copies the weights"
)
WARN_EPOCHS = (
    "epochs: max_epoch={max_epoch!r} is not a whole number of epochs (pycls's MAX_EPOCH"
    " is); it is taken as the schedule's length in the alpha{run}"
)
WARN_DTYPE = (
    "dtype: with alpha {alpha:.3g} and {dtype}'s resolution eps/2 = {half_eps:.3g},"
    " updates can round away unless |params - ema| > {gap:.3g} * |ema| (and do below half"
    " that); keep the EMA in float32 (ema_dtype), round stochastically"
    " (rounding='stochastic', unbiased in bfloat16/float16), or raise update_period (with"
    " rule='exact')"
)


@dataclasses.dataclass(frozen=True)
class EmaReport(Report):
    """What pycls's EMA hyperparameters mean: the :class:`Report` of a pycls schedule.

    ``str(report)`` is a table for people, ``report.to_dict()`` a JSON-ready dict.
    Fields that need the epoch length are None when neither ``steps_per_epoch`` nor
    ``dataset_size`` was given; an infinite half-life (an EMA that never moves) is
    ``math.inf`` here and null in JSON.
    """

    ema_alpha: float
    batch_size: float
    max_epoch: float
    update_period: int
    warmup_epochs: int
    steps_per_epoch: int | None
    """As given, or ``dataset_size // batch_size`` (the last partial batch dropped)."""
    dataset_size: int | None
    """As given, or None."""
    rule: str
    dtype: str
    cadence: str
    """"epoch": the cadence restarts every epoch (pycls); "run": it runs on."""
    alpha: float
    """The per-update step size under ``rule``."""
    alpha_linear: float
    alpha_exact: float
    linear_vs_exact_rel_diff: float
    """``alpha_linear / alpha_exact - 1``."""
    clamped: bool
    """Whether the linear rule's ``min(1, .)`` is active (its raw value exceeds 1)."""
    updates_per_epoch: float | None
    updates_total: int | None
    """EMA updates in the run, the copies during warmup included."""
    updates_post_warmup: int | None
    """EMA updates after warmup: the ones that average."""
    cadence_speedup: float | None
    """``updates_per_epoch * update_period / steps_per_epoch``: how much faster the EMA
    moves than the formula intends because the cadence restarts every epoch."""
    half_life_updates: float
    """``ln 2 / -ln(1 - alpha)``: updates after which a weight counts half as much."""
    half_life_steps: float
    half_life_samples: float
    half_life_epochs: float | None
    half_life_fraction: float | None
    """The half-life as a fraction of the ``max_epoch`` epochs of training."""
    half_life_samples_nominal: float
    """``ln 2 * max_epoch / ema_alpha``: the half-life in samples the rule aims at."""
    start_weight_at_end: float | None
    """``(1 - alpha) ** updates_post_warmup``: the share of the final EMA that is still
    the weights it started averaging from (the initial or the end-of-warmup weights)."""
    dtype_eps: float
    min_registered_gap: float
    """``eps / (2 * alpha)``: an update always registers when
    ``|params - ema| / |ema|`` exceeds this; below half of it, it always rounds away."""
    warnings: tuple[str, ...]

    def __str__(self) -> str:
        return format_report(self)


def steps_per_epoch_from(dataset_size: int, batch_size: float) -> int:
    """``dataset_size // batch_size``: pycls's train loader drops the last partial batch."""
    steps = math.floor(dataset_size / batch_size)
    if steps < 1:
        raise ValueError(
            f"dataset_size={dataset_size!r} is smaller than batch_size={batch_size!r}:"
            " with the last partial batch dropped an epoch has no steps"
        )
    return steps


def _check_epoch_length(
    steps_per_epoch: Any, dataset_size: Any, batch_size: float
) -> tuple[int | None, int | None]:
    spe = None
    if steps_per_epoch is not None:
        spe = _validate.check_positive_int("steps_per_epoch", steps_per_epoch)
    if dataset_size is None:
        return spe, None
    size = _validate.check_positive_int("dataset_size", dataset_size)
    if spe is None:
        return steps_per_epoch_from(size, batch_size), size
    lo, hi = math.floor(size / batch_size), math.ceil(size / batch_size)
    if spe not in (lo, hi):
        raise ValueError(
            f"steps_per_epoch={spe!r} does not match dataset_size={size!r} at"
            f" batch_size={batch_size!r}: expected {lo} (last partial batch dropped)"
            f" or {hi} (kept)"
        )
    return spe, size


def _total_steps(max_epoch: float, steps_per_epoch: int) -> int:
    """Optimizer steps in ``max_epoch`` epochs (a fractional epoch ends the run early)."""
    steps = max_epoch * steps_per_epoch
    nearest = round(steps)
    return nearest if abs(steps - nearest) <= 1e-9 * max(1.0, steps) else math.floor(steps)


def _updates_in(steps: int, update_period: int, steps_per_epoch: int, cadence: str) -> int:
    """EMA updates among the first ``steps`` optimizer steps (the one at step 0 included)."""
    if update_period == 0:
        return 0
    if cadence == "run":
        return -(-steps // update_period)
    per_epoch = -(-steps_per_epoch // update_period)
    epochs, rest = divmod(steps, steps_per_epoch)
    return epochs * per_epoch + -(-rest // update_period)


def half_life_in_updates(alpha: float) -> float:
    """``ln 2 / -ln(1 - alpha)``: 0 for a copy (alpha 1), inf for no move (alpha 0)."""
    if alpha <= 0.0:
        return math.inf
    if alpha >= 1.0:
        return 0.0
    return math.log(2.0) / -math.log1p(-alpha)


def explain_pycls(
    schedule: Pycls,
    *,
    dataset_size: int | None = None,
    dtype: Any = "float32",
    cadence: Cadence = "epoch",
) -> EmaReport:
    r"""What pycls's EMA hyperparameters mean: :func:`ema_jax.explain` of a pycls schedule.

    With :math:`x = \text{ema\_alpha}\cdot n\cdot k/m` (batch size n, update period k,
    m epochs), the per-update step is :math:`\min(1, x)` (linear, pycls) or
    :math:`1-(1-\text{ema\_alpha}/m)^{nk}` (exact). The half-life is
    :math:`\ln 2/-\ln(1-\alpha)` updates of the chosen rule's alpha; an update spans
    ``steps_per_epoch / updates_per_epoch`` optimizer steps on average (k when the
    epoch length is unknown), and a step ``batch_size`` samples.

    Args:
      schedule: the pycls schedule.
      dataset_size: samples per epoch; gives ``steps_per_epoch = dataset_size //
        batch_size`` (pycls's train loader drops the last partial batch). With both,
        ``steps_per_epoch`` must be the floor or the ceiling of their ratio.
      dtype: the EMA's dtype, for the resolution check ("float32", "bfloat16", ...).
      cadence: "epoch" restarts the update cadence every epoch, as pycls does; "run"
        counts it over the whole run.
    """
    s = schedule
    ema_alpha, batch_size, max_epoch = s.ema_alpha, s.batch_size, s.max_epoch
    k, warmup, rule = s.update_period, s.warmup_epochs, s.rule
    spe, size = _check_epoch_length(s.steps_per_epoch, dataset_size, batch_size)
    _validate.check_choice("cadence", cadence, CADENCES)
    resolved = resolve_dtype(dtype)
    eps = float(ml_dtypes.finfo(resolved).eps)

    a_lin = alpha_linear(ema_alpha, batch_size, max_epoch, k)
    a_exact = alpha_exact(ema_alpha, batch_size, max_epoch, k)
    alpha = a_lin if rule == "linear" else a_exact
    x = ema_alpha * (batch_size / max_epoch * k) if ema_alpha else 0.0
    # The linear alpha is never below the exact one (Bernoulli's inequality).
    rel_diff = a_lin / a_exact - 1.0 if a_exact > 0.0 else (0.0 if a_lin == 0.0 else math.inf)

    per_epoch: float | None = None
    total = post = None
    speedup: float | None = None
    steps_per_update = float(k)
    if spe is not None:
        n_steps = _total_steps(max_epoch, spe)
        total = _updates_in(n_steps, k, spe, cadence)
        post = total - _updates_in(min(warmup * spe, n_steps), k, spe, cadence)
        if k == 0:
            per_epoch = 0
        elif cadence == "run":
            per_epoch, speedup = spe / k, 1.0
        else:
            per_epoch = -(-spe // k)
            speedup = per_epoch * k / spe
            steps_per_update = spe / per_epoch

    h_updates = half_life_in_updates(alpha)
    h_steps = h_updates * steps_per_update if math.isfinite(h_updates) else math.inf
    h_samples = h_steps * batch_size
    h_epochs = None if spe is None else h_steps / spe
    fraction = None if h_epochs is None else h_epochs / max_epoch
    start_weight = None
    if post is not None:
        start_weight = math.exp(post * math.log1p(-alpha)) if alpha < 1.0 else float(post == 0)
    nominal = math.log(2.0) * max_epoch / ema_alpha if ema_alpha else math.inf
    gap = eps / (2.0 * alpha) if alpha else math.inf

    warnings: list[str] = []
    if alpha == 0.0:
        why = "update_period=0" if k == 0 else "ema_alpha=0"
        warnings.append(WARN_OFF.format(why=why))
    if rule == "linear" and abs(rel_diff) > APPROX_TOLERANCE:
        warnings.append(WARN_APPROX.format(linear=a_lin, exact=a_exact, diff=rel_diff, x=x))
    if rule == "linear" and x > 1.0:
        warnings.append(WARN_CLAMP.format(x=x))
    if speedup is not None and speedup - 1.0 > CADENCE_TOLERANCE:
        warnings.append(
            WARN_CADENCE.format(per_epoch=per_epoch, spe=spe, k=k, speedup=speedup - 1.0)
        )
    if max_epoch != math.floor(max_epoch):
        run = (
            ""
            if spe is None
            else f" and the run ends mid-epoch, after {_total_steps(max_epoch, spe)} steps"
        )
        warnings.append(WARN_EPOCHS.format(max_epoch=max_epoch, run=run))
    covered = warmup >= max_epoch
    if covered:
        warnings.append(WARN_WARMUP.format(warmup=warmup, max_epoch=max_epoch))
    elif post is not None and alpha > 0.0 and h_updates > post:
        assert h_epochs is not None and start_weight is not None
        after = max_epoch - warmup
        warnings.append(WARN_HALF_LIFE.format(half_life=h_epochs, after=after, start=start_weight))
    if alpha > 0.0 and gap > DTYPE_GAP_TOLERANCE:
        warnings.append(
            WARN_DTYPE.format(alpha=alpha, dtype=resolved.name, half_eps=eps / 2.0, gap=gap)
        )

    return EmaReport(
        ema_alpha=ema_alpha,
        batch_size=batch_size,
        max_epoch=max_epoch,
        update_period=k,
        warmup_epochs=warmup,
        steps_per_epoch=spe,
        dataset_size=size,
        rule=rule,
        dtype=resolved.name,
        cadence=cadence,
        alpha=alpha,
        alpha_linear=a_lin,
        alpha_exact=a_exact,
        linear_vs_exact_rel_diff=rel_diff,
        clamped=x > 1.0,
        updates_per_epoch=per_epoch,
        updates_total=total,
        updates_post_warmup=post,
        cadence_speedup=speedup,
        half_life_updates=h_updates,
        half_life_steps=h_steps,
        half_life_samples=h_samples,
        half_life_epochs=h_epochs,
        half_life_fraction=fraction,
        half_life_samples_nominal=nominal,
        start_weight_at_end=start_weight,
        dtype_eps=eps,
        min_registered_gap=gap,
        warnings=tuple(warnings),
    )

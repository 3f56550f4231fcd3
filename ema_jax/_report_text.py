"""What every report is (:class:`Report`: JSON and text), and the tables ``str(report)`` prints."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import TYPE_CHECKING
from typing import Any

if TYPE_CHECKING:
    from ema_jax._report import EmaReport
    from ema_jax._report_schedule import ScheduleReport


class Report:
    """What :func:`ema_jax.explain` returns: a frozen dataclass with text and JSON forms.

    ``str(report)`` is a table for people, ``report.to_dict()`` a JSON-ready dict
    (infinities and NaN become None), ``report.to_json()`` that dict as one line of
    JSON, and ``report.warnings`` the warnings, each starting with a fixed tag
    ("clamp:", "dtype:", ...). The fields depend on what was explained: pycls's
    hyperparameters (:class:`~ema_jax.EmaReport`), any other schedule
    (:class:`~ema_jax.ScheduleReport`) or an EMA of several averages (one report per
    average, under ``averages``).

    Example:
      >>> import json, ema_jax
      >>> from ema_jax import schedules
      >>> report = ema_jax.explain(schedules.constant(0.999), total_steps=10_000)
      >>> isinstance(report, ema_jax.Report), json.loads(report.to_json())["schedule"]
      (True, 'constant')
    """

    warnings: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict: infinities and NaN become None."""
        return json_ready(self)

    def to_json(self) -> str:
        """:meth:`to_dict` as one line of strict JSON."""
        return json.dumps(self.to_dict(), allow_nan=False)

    def __str__(self) -> str:
        raise NotImplementedError


def json_ready(report: Any) -> dict[str, Any]:
    """A report dataclass's fields as a JSON-ready dict: tuples become lists, and
    infinities and NaN None (JSON has neither)."""

    def clean(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, tuple):
            return [clean(v) for v in value]
        return value

    return {f.name: clean(getattr(report, f.name)) for f in dataclasses.fields(report)}


_UNKNOWN = "unknown (needs steps_per_epoch or dataset_size)"


def _fmt(value: float | None, spec: str = ".6g") -> str:
    if value is None:
        return _UNKNOWN
    if math.isinf(value):
        return "infinite (the EMA never moves)"
    if spec == "count":
        return f"{value:,.0f}" if value >= 1000 else f"{value:.4g}"
    return format(value, spec)


def format_report(report: EmaReport) -> str:
    """``report`` as a two-column table for people (what ``str(report)`` gives)."""
    r = report
    spe = "unknown" if r.steps_per_epoch is None else f"{r.steps_per_epoch}"
    if r.dataset_size is not None:
        spe += f" (dataset_size {r.dataset_size} // batch_size {r.batch_size:g})"
    mark = {r.rule: " <- rule"}
    if r.updates_total is None:
        updates = _UNKNOWN
    else:
        updates = (
            f"{r.updates_per_epoch:.6g} per epoch, {r.updates_total} in the run,"
            f" {r.updates_post_warmup} after warmup"
        )
    speedup = _fmt(r.cadence_speedup, ".4f")
    if r.cadence_speedup is not None and r.cadence == "epoch":
        speedup += (
            f" ({r.updates_per_epoch} updates meant for {r.update_period} steps each"
            f" in a {r.steps_per_epoch}-step epoch)"
        )
    resolution = (
        f"{r.dtype_eps / 2:.3g} (updates register when |params - ema| >"
        f" {_fmt(r.min_registered_gap, '.3g')} * |ema|)"
    )
    rows = [
        ("per-update alpha, linear", f"{r.alpha_linear:.6g}{mark.get('linear', '')}"),
        ("per-update alpha, exact", f"{r.alpha_exact:.6g}{mark.get('exact', '')}"),
        ("linear vs exact", f"{r.linear_vs_exact_rel_diff:+.2%}"),
        ("clamped by min(1, .)", "yes" if r.clamped else "no"),
        ("EMA updates", updates),
        ("cadence speedup", speedup),
        ("half-life, updates", _fmt(r.half_life_updates, ".5g")),
        ("half-life, optimizer steps", _fmt(r.half_life_steps, "count")),
        ("half-life, samples", _fmt(r.half_life_samples, "count")),
        ("half-life, epochs", _fmt(r.half_life_epochs, ".4g")),
        ("half-life, share of training", _fmt(r.half_life_fraction, ".2%")),
        ("nominal half-life, samples", _fmt(r.half_life_samples_nominal, "count")),
        ("start weights' share at end", _fmt(r.start_weight_at_end, ".3g")),
        (f"{r.dtype} resolution, eps/2", resolution),
    ]
    width = max(len(label) for label, _ in rows)
    lines = [
        f"EMA of weights: ema_alpha={r.ema_alpha:g} batch_size={r.batch_size:g}"
        f" max_epoch={r.max_epoch:g} update_period={r.update_period}"
        f" warmup_epochs={r.warmup_epochs} rule={r.rule} dtype={r.dtype}",
        f"steps_per_epoch: {spe}",
        "",
        *(f"  {label:<{width}}  {value}" for label, value in rows),
        "",
        "warnings:" + ("" if r.warnings else " none"),
        *(f"  - {w}" for w in r.warnings),
    ]
    return "\n".join(lines)


def format_schedule_report(report: ScheduleReport) -> str:
    """A :class:`~ema_jax.ScheduleReport` as a table for people."""
    r = report
    hyper = " ".join(f"{k}={v!r}" for k, v in r.settings.items() if k != "name")
    end_rows = [
        (
            "EMA updates",
            "unknown (needs total_steps)"
            if r.updates_total is None
            else f"{r.updates_total:,} in {r.total_steps:,} steps, every {r.update_period}"
            + ("" if r.copy_updates is None else f"; {r.copy_updates:,} copy the weights"),
        ),
        ("alpha at the end", _opt(r.alpha_end, ".6g")),
        ("half-life at the end, updates", _opt(r.half_life_updates, ".5g")),
        ("half-life at the end, steps", _opt(r.half_life_steps, "count")),
        ("half-life at the end, samples", _opt(r.half_life_samples, "count")),
        ("half-life at the end, share", _opt(r.half_life_fraction, ".2%")),
        ("start weights' share at end", _opt(r.start_weight_at_end, ".3g")),
        (
            f"{r.dtype} resolution, eps/2",
            f"{r.dtype_eps / 2:.3g}"
            + (
                ""
                if r.min_registered_gap is None
                else f" (updates register when |params - ema| > {_fmt(r.min_registered_gap, '.3g')}"
                " * |ema|)"
            ),
        ),
    ]
    if r.fixed_point_bias is not None:
        end_rows.append(("fixed point of the blend", f"{1 + r.fixed_point_bias:.8g} x params"))
    width = max(len(label) for label, _ in end_rows)
    header = f"  {'step':>12}  {'alpha':>11}  {'half-life, steps':>16}  {'samples':>14}  share"
    curve = [
        f"  {step:>12,}  {alpha:>11.5g}  {_fmt(h, 'count'):>16}  {_opt(s, 'count'):>14}"
        f"  {_opt(f, '.2%')}"
        for step, alpha, h, s, f in r.curve
    ]
    lines = [
        f"EMA of weights: schedule={r.schedule} {hyper} dtype={r.dtype}",
        "",
        "step sizes over the run (at updates):",
        header,
        *curve,
        "",
        *(f"  {label:<{width}}  {value}" for label, value in end_rows),
        "",
        "warnings:" + ("" if r.warnings else " none"),
        *(f"  - {w}" for w in r.warnings),
    ]
    return "\n".join(lines)


def _opt(value: float | None, spec: str) -> str:
    return "-" if value is None else _fmt(value, spec)

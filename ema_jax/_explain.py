"""The one front door of the diagnostics: :func:`explain` of a schedule or an EMA.

Whatever it is given (pycls's hyperparameters, any schedule, an :class:`~ema_jax.Ema`
of one or several averages), :func:`explain` returns a :class:`Report`: ``str()`` of
it is a table, ``to_dict()``/``to_json()`` its JSON. The reports themselves are built
by :mod:`ema_jax._report` (pycls) and :mod:`ema_jax._report_schedule` (any other
schedule). Host-side NumPy only; the jitted core (``_transform.py``) imports this
module inside :meth:`ema_jax.Ema.explain`, never at module level, and this module does
not import the core (an EMA is known by its ``schedules``), so that the import graph
has no circle.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ema_jax import _validate
from ema_jax._report import CADENCES
from ema_jax._report import Cadence
from ema_jax._report import EmaReport
from ema_jax._report import explain_pycls
from ema_jax._report import steps_per_epoch_from
from ema_jax._report_schedule import ScheduleReport
from ema_jax._report_schedule import explain_schedule
from ema_jax._report_text import Report
from ema_jax._report_text import json_ready
from ema_jax.schedules import Pycls
from ema_jax.schedules import Schedule
from ema_jax.schedules import pycls

resolve_dtype = _validate.resolve_dtype

__all__ = [
    "CADENCES",
    "AveragesReport",
    "EmaReport",
    "Report",
    "ScheduleReport",
    "explain",
    "resolve_dtype",
]


@dataclasses.dataclass(frozen=True)
class AveragesReport(Report):
    """The :class:`Report` of an EMA that keeps several averages: one report per average.

    ``report.averages[k]`` (or ``report[k]``, ``report["name"]``) is the report of
    average ``k``; iterating gives them in order, as the tuple that ``Ema.explain()``
    returned before. ``warnings`` are theirs, each prefixed with the average's name
    (or index).

    Example:
      >>> import ema_jax
      >>> from ema_jax import schedules
      >>> ema = ema_jax.ema({"fast": schedules.constant(0.9),
      ...                    "slow": schedules.constant(0.999)})
      >>> report = ema.explain()
      >>> report["slow"] == ema_jax.explain(schedules.constant(0.999)), len(report)
      (True, 2)
    """

    names: tuple[str, ...] | None
    """The averages' names, or None when they go by index."""
    averages: tuple[Report, ...]

    @property
    def labels(self) -> tuple[str, ...]:
        """Each average's name, or its index as a string."""
        return self.names or tuple(str(k) for k in range(len(self.averages)))

    @property
    def warnings(self) -> tuple[str, ...]:  # type: ignore[override]  # derived, not a field
        return tuple(
            f"[{label}] {w}"
            for label, r in zip(self.labels, self.averages, strict=True)
            for w in r.warnings
        )

    def to_dict(self) -> dict[str, Any]:
        """``{"names": [...] | None, "averages": [<each report's dict>], "warnings": [...]}``."""
        return {
            "names": None if self.names is None else list(self.names),
            "averages": [json_ready(r) for r in self.averages],
            "warnings": list(self.warnings),
        }

    def __str__(self) -> str:
        sections = [
            f"== average {label} ==\n{r}"
            for label, r in zip(self.labels, self.averages, strict=True)
        ]
        return "\n\n".join(sections)

    def __len__(self) -> int:
        return len(self.averages)

    def __iter__(self) -> Any:
        return iter(self.averages)

    def __getitem__(self, which: int | str) -> Report:
        if isinstance(which, str):
            if self.names is None or which not in self.names:
                raise KeyError(f"which must be one of the names {self.names}, got {which!r}")
            return self.averages[self.names.index(which)]
        return self.averages[which]


def explain(
    subject: Any = None,
    /,
    *,
    dataset_size: int | None = None,
    total_steps: int | None = None,
    dtype: Any = None,
    cadence: Cadence | None = None,
    **pycls_hyperparameters: Any,
) -> Report:
    r"""What an EMA schedule means, before a training run is spent on it.

    ``explain(schedule)`` reports on any schedule (one from :mod:`ema_jax.schedules`
    or a registered family of your own); ``explain(ema)`` on an :class:`~ema_jax.Ema`
    in its ``ema_dtype``; ``explain(ema_alpha=..., batch_size=..., max_epoch=...,
    ...)`` on pycls's hyperparameters (those of :class:`ema_jax.schedules.Pycls`), as
    ``explain(schedules.pycls(...))`` does. Every answer is a :class:`Report`: a pycls
    schedule's is an :class:`~ema_jax.EmaReport` (alphas under both rules, update
    counts, half-lives in updates, steps, samples and epochs), any other schedule's a
    :class:`~ema_jax.ScheduleReport` (its step sizes over the run, half-lives at the
    end), an EMA of several averages' an :class:`AveragesReport` of one per average.

    Args:
      subject: a schedule or an :class:`~ema_jax.Ema`; None builds
        ``schedules.pycls(**pycls_hyperparameters)``.
      dataset_size: samples per epoch (pycls): gives ``steps_per_epoch =
        dataset_size // batch_size`` when the schedule has none.
      total_steps: optimizer steps in the run, for schedules that do not know it.
      dtype: the EMA's dtype, for the resolution check ("float32", "bfloat16", ...);
        None: the EMA's ``ema_dtype``, else float32.
      cadence: pycls only: "epoch" restarts the update cadence every epoch, "run"
        counts it over the whole run; None takes the schedule's own (and "epoch"
        for hyperparameters given as keywords, as pycls does).
      **pycls_hyperparameters: ``ema_alpha``, ``batch_size``, ``max_epoch``,
        ``update_period``, ``warmup_epochs``, ``steps_per_epoch``, ``rule``.

    Returns:
      A :class:`Report`: ``print`` it, or log ``report.to_dict()``.

    Raises:
      ValueError: an argument out of range, named with its value.
      TypeError: ``subject`` is neither a schedule nor an EMA, or comes with
        hyperparameters.

    Example:
      >>> import ema_jax
      >>> r = ema_jax.explain(ema_alpha=1e-5, batch_size=128, max_epoch=200,
      ...                     dataset_size=1_281_167)
      >>> r.steps_per_epoch, r.updates_per_epoch, r.warnings
      (10009, 313, ())
      >>> round(r.half_life_epochs, 1), round(r.half_life_fraction, 4)
      (10.8, 0.0541)
    """
    if subject is not None and pycls_hyperparameters:
        raise TypeError(
            f"explain got a schedule and hyperparameters {sorted(pycls_hyperparameters)}:"
            " pass one or the other"
        )
    options: dict[str, Any] = dict(
        dataset_size=dataset_size, total_steps=total_steps, cadence=cadence
    )
    if _is_ema(subject):
        if dtype is None:
            dtype = subject.ema_dtype if subject.ema_dtype is not None else "float32"
        reports = tuple(_explain_schedule(s, dtype=dtype, **options) for s in subject.schedules)
        if subject.several:
            return AveragesReport(names=subject.names, averages=reports)
        return reports[0]
    dtype = "float32" if dtype is None else dtype
    if subject is None:
        spe = pycls_hyperparameters.get("steps_per_epoch")
        if spe is None and dataset_size is not None and "batch_size" in pycls_hyperparameters:
            batch = _validate.check_positive_real("batch_size", pycls_hyperparameters["batch_size"])
            size = _validate.check_positive_int("dataset_size", dataset_size)
            pycls_hyperparameters["steps_per_epoch"] = steps_per_epoch_from(size, batch)
        subject = pycls(**pycls_hyperparameters)
        options["cadence"] = "epoch" if cadence is None else cadence
    return _explain_schedule(subject, dtype=dtype, **options)


def _is_ema(subject: Any) -> bool:
    """Whether ``subject`` is an :class:`ema_jax.Ema`: its schedules, names and dtype."""
    return not isinstance(subject, Schedule) and all(
        hasattr(subject, name) for name in ("schedules", "several", "names", "ema_dtype")
    )


def _explain_schedule(
    schedule: Any,
    *,
    dataset_size: int | None,
    total_steps: int | None,
    dtype: Any,
    cadence: Cadence | None,
) -> Report:
    """One schedule's report: pycls's own, or the one of any schedule."""
    if isinstance(schedule, Pycls):
        if total_steps is not None:
            raise ValueError(
                f"total_steps={total_steps!r} does not apply to a pycls schedule: its run is"
                " max_epoch epochs of steps_per_epoch steps"
            )
        if cadence is None:
            cadence = "run" if schedule.steps_per_epoch is None else "epoch"
        return explain_pycls(schedule, dataset_size=dataset_size, dtype=dtype, cadence=cadence)
    if not isinstance(schedule, Schedule):
        raise TypeError(
            "explain takes a schedule from ema_jax.schedules or an ema_jax.Ema,"
            f" got {schedule!r:.80}"
        )
    for name, value in (("dataset_size", dataset_size), ("cadence", cadence)):
        if value is not None:
            raise ValueError(f"{name}={value!r} applies to pycls schedules only")
    return explain_schedule(schedule, total_steps=total_steps, dtype=dtype)

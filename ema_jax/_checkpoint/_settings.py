"""The EMA's settings in a checkpoint against the target's: what may change, what may not.

Compared: the schedule (every hyperparameter), ``ema_dtype``, the number of averages,
and the dtype of every averaged leaf (with ``ema_dtype=None`` the EMA is kept in the
parameters' dtype, so a float32 EMA restored into bfloat16 parameters would be cut
to bfloat16 without any setting having changed). The NaN/Inf guard is not compared:
it decides only what happens to non-finite parameters; nor is ``rounding``, which
changes how later updates round, not what the saved average means (a low-precision EMA
that round-to-nearest would freeze warns when the target is built). Nor is ``constant``'s ``form``:
the lerp and flax ``nnx.EMA``'s two-weight blend are the same average up to an ulp per
update, and checkpoints saved before ``form`` existed (nnx's blend) resume under the
more accurate default.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from ema_jax._checkpoint._errors import EmaSettingsMismatchError
from ema_jax._checkpoint._record import json_ready

COMPARED_SETTINGS = ("schedule", "ema_dtype")  # what decides the EMA's numbers
ROUNDING_FIELDS = {"constant": ("form",)}  # a family's fields that change rounding only

_LOG = logging.getLogger("ema_jax")


def averages(settings: Mapping[str, Any]) -> int:
    """How many averages an EMA with these settings keeps (1, or one per schedule)."""
    schedule = settings.get("schedule")
    if isinstance(schedule, list):
        return len(schedule)
    if isinstance(schedule, Mapping) and not isinstance(schedule.get("name"), str):
        return len(schedule)  # several, by name
    return 1


def _comparable(schedule: Any) -> Any:
    """A schedule's settings (or a list or dict of them) without its rounding-only fields."""
    if isinstance(schedule, list):
        return [_comparable(s) for s in schedule]
    if isinstance(schedule, Mapping):
        name = schedule.get("name")
        if isinstance(name, str):
            drop = ROUNDING_FIELDS.get(name, ())
            return {k: v for k, v in schedule.items() if k not in drop}
        return {k: _comparable(v) for k, v in schedule.items()}
    return schedule


def ema_changes(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Each difference in the compared settings, with both values."""
    current = json_ready(current)
    changes = []
    for key in COMPARED_SETTINGS:
        old, new = saved.get(key), current.get(key)
        if key == "schedule":
            old, new = _comparable(old), _comparable(new)
        if isinstance(old, Mapping) and isinstance(new, Mapping):
            names = list(new) + [name for name in old if name not in new]
            changes += [
                f"{key}.{name} is {old.get(name)!r} in the checkpoint but {new.get(name)!r}"
                " in the target"
                for name in names
                if old.get(name) != new.get(name)
            ]
        elif old != new:
            changes.append(f"{key} is {old!r} in the checkpoint but {new!r} in the target")
    return changes


def dtype_changes(
    arrays: Mapping[str, Any], target: Mapping[str, Any], prefixes: tuple[str, ...]
) -> list[str]:
    """The averaged leaves (paths under ``prefixes``) saved in another dtype than the
    target's: one entry naming the first and how many."""
    changed = []
    for path, leaf in target.items():
        saved = arrays.get(path)
        dtype = getattr(leaf, "dtype", None)
        if saved is None or dtype is None or not path.startswith(prefixes):
            continue
        name = getattr(dtype, "name", str(dtype))
        if saved["dtype"] != name:
            changed.append((path, saved["dtype"], name))
    if not changed:
        return []
    path, old, new = changed[0]
    more = f" (and {len(changed) - 1} more averaged leaves)" if len(changed) > 1 else ""
    return [
        f"the averaged leaf {path} is {old} in the checkpoint but {new} in the target{more};"
        " with ema_dtype=None the EMA is kept in the parameters' dtype, so pass"
        f" ema_dtype=jnp.{old} to keep the {old} average"
    ]


def check_settings(
    saved: Mapping[str, Any] | None,
    current: Mapping[str, Any],
    extra_changes: list[str],
    where: str,
    allow_ema_change: bool,
    call: str,
) -> list[str]:
    """Raises EmaSettingsMismatchError for a change not allowed; returns the changes allowed.

    Another number of averages always raises: the saved values cannot be carried over
    into averages they are not (which of two averages would become the one?).
    """
    changes = [] if saved is None else ema_changes(saved, current)
    if not any(change.startswith("ema_dtype ") for change in changes):
        changes += extra_changes  # else the leaves' dtypes change with ema_dtype
    if saved is not None and averages(saved) != averages(current):
        raise EmaSettingsMismatchError(
            f"{where} holds an EMA with {averages(saved)} average(s), but the target's"
            f" has {averages(current)}: "
            + "; ".join(changes)
            + ". The saved averages cannot become other ones, also not with"
            " allow_ema_change=True: restore into an EMA with the checkpoint's schedules"
            " (then keep the one you want with Ema.average), or start the new EMA afresh"
        )
    if changes and not allow_ema_change:
        raise EmaSettingsMismatchError(
            f"{where} holds an EMA with other settings than the target's: "
            + "; ".join(changes)
            + ". To keep its EMA values and continue with the target's settings, pass"
            f" allow_ema_change=True to {call}"
        )
    return changes


def log_allowed(where: str, changes: list[str]) -> None:
    """The warning of a restore that ``allow_ema_change=True`` let through."""
    if changes:
        _LOG.warning(
            "%s: the EMA's settings change (%s); its values are kept, in the target's"
            " dtype, and the target's settings apply from now on",
            where,
            "; ".join(changes),
        )

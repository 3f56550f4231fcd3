"""What every schedule is: for update call ``i``, whether to update and with which step size.

A schedule is a small frozen dataclass holding its own hyperparameters, validated once
at construction. The transform (:func:`ema_jax.ema`) asks it for a :class:`Plan` at
each call; the same formulas, evaluated in float64 NumPy by :meth:`Schedule.alpha_at`,
feed :func:`ema_jax.explain` and the tests.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any
from typing import ClassVar
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Scalar = Any  # a Python number, a NumPy scalar, or a traced jax.Array of shape ()


class Plan(NamedTuple):
    """What the update call at step ``i`` does (see :meth:`Schedule.plan`).

    Python values are static: ``update=True`` needs no ``lax.cond``, a float ``alpha``
    is a compile-time constant, ``copy=False`` needs no select.
    """

    update: bool | jax.Array  # shape=(), bool: does this call change the EMA?
    alpha: float | jax.Array  # shape=(), JAX's default float: its step size (1: the parameters)
    copy: bool | jax.Array  # shape=(), bool: the EMA becomes exactly the parameters
    keep: float | jax.Array | None = None  # the old EMA's weight when not 1 - alpha
    applied: jax.Array | None = None  # several averages: which of them this call updates


def real(i: Scalar, xp: Any) -> Any:
    """The call index as a float: float64 on the host, JAX's default float under jit.

    Under jit (``xp=jnp``) that is float32, or float64 under ``jax_enable_x64``: a float64
    EMA then gets a float64 step size.
    """
    return xp.asarray(i, float if xp is jnp else np.float64)


def steps_since_update(i: Scalar, update_period: int, xp: Any) -> Any:
    """Optimizer steps since the previous update, for an update at call ``i``.

    ``update_period``, except at call 0, which follows the EMA's start by one step
    (with period 1: the Python float 1.0, so that a constant step size stays static).
    """
    if update_period == 1:
        return 1.0
    return xp.minimum(real(i, xp) + 1.0, float(update_period))


def half_life_alpha(steps: Any, half_life: Any, xp: Any) -> Any:
    """``1 - 0.5 ** (steps / half_life)``, exact for tiny ratios (``-expm1``).

    A Python float when both are Python numbers: a static step size.
    """
    if all(type(x) in (int, float) for x in (steps, half_life)):
        return -math.expm1(-math.log(2.0) * steps / half_life)
    return -xp.expm1(-math.log(2.0) * steps / half_life)


class Schedule:
    """Base class: a step-size schedule for :func:`ema_jax.ema`.

    Subclasses are frozen dataclasses of their hyperparameters; they set ``name``
    and ``update_period`` and define ``_alpha(i, xp)``, the
    step size of an update at call ``i`` written once with ``xp`` (``jax.numpy`` under
    jit, NumPy on the host); a schedule whose step size never changes returns a Python
    float there (the static fast path). ``_copies(i, xp)`` is True where the update
    copies the parameters exactly; ``_updates(i)`` decides the cadence.
    """

    name: ClassVar[str]
    update_period: int  # a field of every subclass

    # -- what subclasses define ------------------------------------------------
    def _alpha(self, i: Scalar, xp: Any) -> Any:
        raise NotImplementedError

    def _copies(self, i: Scalar, xp: Any) -> Any:
        return False

    def _updates(self, i: Scalar) -> Any:
        """Update every ``update_period`` calls, from call 0 on (0: never).

        Traced even for period 1: the update then stays one ``lax.cond`` whose
        skipped branch is empty, the structure tests/test_structure.py pins.
        """
        k = self.update_period
        return False if k == 0 else i % k == 0

    def _keep(self) -> float | None:
        return None

    # -- what the transform and the diagnostics use ----------------------------
    @property
    def static_alpha(self) -> float | None:
        """The step size of every averaging update when it is a constant, else None."""
        with np.errstate(all="ignore"):  # e.g. log1p(-1) of a first update that copies
            alpha = self._alpha(0, np)
        return alpha if type(alpha) is float else None  # np.float64 is a float subclass

    def plan(self, i: jax.Array) -> Plan:
        """What update call ``i`` (``EmaState.step`` before the call, int32) does."""
        return Plan(
            update=self._updates(i),
            alpha=self._alpha(i, jnp),
            copy=self._copies(i, jnp),
            keep=self._keep(),
        )

    def alpha_at(self, i: int) -> float | None:
        """The step size of call ``i`` in float64, or None when call ``i`` does not update.

        A copy is 1.0. Host-side and exact: for reports, plots and tests.
        """
        if not bool(self._updates(i)):
            return None
        if bool(self._copies(i, np)):
            return 1.0
        with np.errstate(all="ignore"):
            return float(self._alpha(i, np))

    def settings(self) -> dict[str, Any]:
        """``{"name": ..., <hyperparameters>}``: JSON-ready, stored with checkpoints."""
        fields = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)  # type: ignore[arg-type]  # subclasses are
            if f.init
        }
        return {"name": self.name, **fields}

    def steps_in_run(self) -> int | None:
        """Optimizer steps in the whole run, when the schedule knows them, else None."""
        return None

"""The schedule protocol: for update call ``i``, whether to update and with which step size.

A schedule is a small frozen dataclass holding its own hyperparameters, validated once
at construction. The transform (:func:`ema_jax.ema`) asks it for a :class:`Plan` at
each call; the same formulas, evaluated in float64 NumPy by :meth:`Schedule.alpha_at`,
feed :func:`ema_jax.explain` and the tests. A family is a subclass that defines the
hooks of :class:`Schedule` and is registered with :func:`register`, which makes it
known to the command line and to the tests; ``docs/schedules.md`` is the guide.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any
from typing import ClassVar
from typing import NamedTuple
from typing import TypeVar

import jax
import jax.numpy as jnp
import numpy as np

from ema_jax import _validate

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
    """Base class: a step-size schedule for :func:`ema_jax.ema` (the schedule protocol).

    A family is a frozen dataclass subclass of its hyperparameters that sets ``name``
    and has an ``update_period`` field, and defines the hooks below, each written
    once with ``xp`` (``jax.numpy`` under jit, where ``i`` is a traced int32 scalar
    and reals are float32; NumPy on the host, where ``i`` is a Python or NumPy int,
    or an int64 array, and reals are float64):

    - :meth:`step_size` (required): the step size of an update at call ``i``. A
      Python float when it never changes: the static fast path.
    - :meth:`copies_at`: True where the update copies the parameters (warmup).
    - :meth:`updates_at`: whether call ``i`` updates (the cadence); by default every
      ``update_period`` calls from call 0.
    - :meth:`keep_weight`: the old average's weight when it is not ``1 - alpha``.
    - :meth:`example`: a typical instance, for the tests, the docs and the help.

    ``__post_init__`` checks ``update_period`` (an integer ``>= min_update_period``);
    a family that validates its own fields calls ``super().__post_init__()`` first.
    The underscored names (``_alpha``, ``_copies``, ``_updates``, ``_keep``) are the
    hooks' former names and still work, in either direction.
    """

    name: ClassVar[str]
    min_update_period: ClassVar[int] = 1
    """The smallest ``update_period`` (pycls: 0, an EMA turned off)."""
    update_period: int  # a field of every subclass

    def __post_init__(self) -> None:
        check = (
            _validate.check_nonnegative_int
            if self.min_update_period == 0
            else _validate.check_positive_int
        )
        object.__setattr__(self, "update_period", check("update_period", self.update_period))

    # -- the hooks: what a family defines ---------------------------------------
    def step_size(self, i: Scalar, xp: Any) -> Any:
        """The step size ``alpha`` of an update at call ``i`` (required).

        Args:
          i: the call index, 0-based (``EmaState.step`` before the call): a traced
            int32 scalar under jit, a Python int or an int64 NumPy array on the host.
          xp: ``jax.numpy`` under jit (compute in float32: :func:`real` casts ``i``),
            ``numpy`` on the host (float64, for :func:`ema_jax.explain` and tests).

        Returns:
          ``alpha`` in [0, 1]: a Python float when it does not depend on ``i`` (the
          transform then compiles it as a constant), else an ``xp`` scalar or array
          shaped like ``i``. Where :meth:`copies_at` is True its value is ignored
          (it may be inf or NaN there).
        """
        if type(self)._alpha is not Schedule._alpha:  # a family with the former name
            return self._alpha(i, xp)
        raise NotImplementedError(f"{type(self).__name__} must define step_size(i, xp)")

    def copies_at(self, i: Scalar, xp: Any) -> Any:
        """Whether an update at call ``i`` copies the parameters exactly (default: never).

        A Python bool when it is the same at every call (no select is compiled), else
        a bool ``xp`` value shaped like ``i``.
        """
        if type(self)._copies is not Schedule._copies:
            return self._copies(i, xp)
        return False

    def updates_at(self, i: Scalar) -> Any:
        """Whether call ``i`` updates the EMA: the cadence (default: every ``update_period``).

        Written with Python operators only (``%``, ``//``, comparisons), so that one
        expression serves a traced ``i`` and a host one. The default updates at every
        ``update_period``-th call from call 0 on (0: never); it stays traced even for
        period 1, so that the update is one ``lax.cond`` whose skipped branch is
        empty (tests/test_structure.py pins that structure).
        """
        if type(self)._updates is not Schedule._updates:
            return self._updates(i)
        k = self.update_period
        return False if k == 0 else i % k == 0

    def keep_weight(self) -> float | None:
        """The old average's weight, a Python float, when the blend is the two-weight
        ``keep * ema + (1 - keep) * params`` (a constant decay, as nnx.EMA); None
        (default) for ``ema + alpha * (params - ema)``."""
        if type(self)._keep is not Schedule._keep:
            return self._keep()
        return None

    @classmethod
    def example(cls: type[S]) -> S:
        """A typical instance of the family: the tests and the docs run it.

        The default builds the family with its defaults (``cls()``); a family with
        required hyperparameters overrides it.
        """
        return cls()

    # -- the former names of the hooks, kept working ----------------------------
    def _alpha(self, i: Scalar, xp: Any) -> Any:
        return self.step_size(i, xp)

    def _copies(self, i: Scalar, xp: Any) -> Any:
        return self.copies_at(i, xp)

    def _updates(self, i: Scalar) -> Any:
        return self.updates_at(i)

    def _keep(self) -> float | None:
        return self.keep_weight()

    # -- what the transform and the diagnostics use ----------------------------
    @property
    def static_alpha(self) -> float | None:
        """The step size of every averaging update when it is a constant, else None."""
        with np.errstate(all="ignore"):  # e.g. log1p(-1) of a first update that copies
            alpha = self.step_size(0, np)
        return alpha if type(alpha) is float else None  # np.float64 is a float subclass

    def plan(self, i: jax.Array) -> Plan:
        """What update call ``i`` (``EmaState.step`` before the call, int32) does."""
        return Plan(
            update=self.updates_at(i),
            alpha=self.step_size(i, jnp),
            copy=self.copies_at(i, jnp),
            keep=self.keep_weight(),
        )

    def alpha_at(self, i: int) -> float | None:
        """The step size of call ``i`` in float64, or None when call ``i`` does not update.

        A copy is 1.0. Host-side and exact: for reports, plots and tests.
        """
        if not bool(self.updates_at(i)):
            return None
        if bool(self.copies_at(i, np)):
            return 1.0
        with np.errstate(all="ignore"):
            return float(self.step_size(i, np))

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


S = TypeVar("S", bound=Schedule)

REGISTRY: dict[str, type[Schedule]] = {}
"""Every registered family by its ``name``, in registration order: what the command
line offers (``python -m ema_jax explain --schedule NAME``) and the tests iterate."""


def register(cls: type[S]) -> type[S]:
    """Registers a schedule family (a class decorator): the one line a new family needs.

    Put it above ``@dataclasses.dataclass``. The family must subclass
    :class:`Schedule`, be a dataclass with an ``update_period`` field and set
    ``name`` (an identifier); its :meth:`Schedule.example` should build a typical
    instance (tests/test_schedule_protocol.py runs every registered family's).

    Raises:
      TypeError: ``cls`` is not such a family.
      ValueError: another family is registered under the same name.

    Example:
      >>> from ema_jax import schedules
      >>> schedules.REGISTRY["pycls"] is schedules.Pycls
      True
    """
    if not (isinstance(cls, type) and issubclass(cls, Schedule)):
        raise TypeError(f"register takes a subclass of ema_jax.schedules.Schedule, got {cls!r}")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name.isidentifier():
        raise TypeError(f"{cls.__name__}.name must be an identifier string, got {name!r}")
    if not dataclasses.is_dataclass(cls) or "update_period" not in {
        f.name for f in dataclasses.fields(cls) if f.init
    }:
        raise TypeError(
            f"{cls.__name__} must be a dataclass with an update_period field"
            " (put @register above @dataclasses.dataclass)"
        )
    other = REGISTRY.get(name)
    if other is not None and other.__qualname__ != cls.__qualname__:
        raise ValueError(
            f"a schedule family named {name!r} is already registered ({other.__module__}."
            f"{other.__qualname__}); give {cls.__name__} another name"
        )
    REGISTRY[name] = cls  # re-registering the same family (a reloaded module) replaces it
    return cls

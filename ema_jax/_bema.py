"""BEMA, the bias-corrected EMA (Block & Zhang, 2025): ``ema_t + alpha_t * (theta_t - theta_0)``.

TRL's ``BEMACallback`` step for step, as an ``init``/``update`` transform like
:func:`ema_jax.ema`. The plain EMA inside it is an :class:`ema_jax.Ema` under
:class:`BemaSchedule` (same blend, guard and count); this module adds ``theta_0`` and
the bias-corrected output. Pure JAX, like the core.
"""

from __future__ import annotations

import dataclasses
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ema_jax import _memory
from ema_jax import _trees
from ema_jax import _validate
from ema_jax._transform import Ema
from ema_jax._transform import EmaState
from ema_jax._transform import Nonfinite
from ema_jax._transform import Rounding
from ema_jax.schedules._base import Scalar
from ema_jax.schedules._base import Schedule
from ema_jax.schedules._base import real

PyTree = Any


@dataclasses.dataclass(frozen=True, kw_only=True)
class BemaSchedule(Schedule):
    r"""BEMA's EMA: when it updates, its step size ``beta_t`` and its bias weight ``alpha_t``.

    Call ``i`` (0-based) is TRL's ``global_step`` :math:`t = i + 1`. With
    :math:`\tau` = ``update_after``, the EMA copies the weights at :math:`t = \tau`
    (its snapshot; at ``init`` when :math:`\tau = 0`), then updates at
    :math:`t = \tau + k\,\phi` (:math:`k \ge 1`, :math:`\phi` = ``update_period``) with

    .. math::
      \beta_t = \max\big((\rho + \gamma t)^{-\kappa}, \beta_\min\big),\qquad
      \alpha_t = (\rho + \gamma t)^{-\eta},

    :math:`\rho` = ``lag``, :math:`\gamma` = ``multiplier``, :math:`\kappa` =
    ``ema_power``, :math:`\eta` = ``bias_power``, :math:`\beta_\min` =
    ``min_ema_multiplier``. :meth:`alpha_at` is :math:`\beta_t`, the EMA's step size
    (so that :func:`ema_jax.explain` reports the EMA's half-life); :meth:`bias_at` is
    :math:`\alpha_t`.

    Example:
      >>> from ema_jax._bema import BemaSchedule
      >>> s = BemaSchedule(update_period=2)
      >>> s.alpha_at(0), s.alpha_at(1) == 12 ** -0.5, round(s.bias_at(1), 6)
      (None, True, 0.608364)
    """

    name = "bema"
    update_period: int = 400
    ema_power: float = 0.5
    bias_power: float = 0.2
    lag: float = 10.0
    update_after: int = 0
    multiplier: float = 1.0
    min_ema_multiplier: float = 0.0

    def __post_init__(self) -> None:
        s = object.__setattr__
        v = _validate
        super().__post_init__()  # update_period
        s(self, "ema_power", v.check_nonnegative_real("ema_power", self.ema_power))
        s(self, "bias_power", v.check_nonnegative_real("bias_power", self.bias_power))
        s(self, "lag", v.check_nonnegative_real("lag", self.lag))
        s(self, "update_after", v.check_nonnegative_int("update_after", self.update_after))
        s(self, "multiplier", v.check_positive_real("multiplier", self.multiplier))
        s(
            self,
            "min_ema_multiplier",
            v.check_real_in("min_ema_multiplier", self.min_ema_multiplier, "[0, 1]"),
        )

    def _base(self, i: Scalar, xp: Any) -> Any:
        """``lag + multiplier * t`` at call ``i`` (``t = i + 1``, TRL's global step)."""
        return self.lag + self.multiplier * (real(i, xp) + 1.0)

    def step_size(self, i: Scalar, xp: Any) -> Any:
        return xp.maximum(self._base(i, xp) ** -self.ema_power, self.min_ema_multiplier)

    def _bias(self, i: Scalar, xp: Any) -> Any:
        return self._base(i, xp) ** -self.bias_power

    def _snapshot(self, i: Scalar) -> Any:
        """Whether call ``i`` is the snapshot at ``t = update_after`` (never when it is 0)."""
        return self.update_after > 0 and i == self.update_after - 1

    def copies_at(self, i: Scalar, xp: Any) -> Any:
        return self._snapshot(i)

    def updates_at(self, i: Scalar) -> Any:
        # t >= update_after and (t - update_after) % update_period == 0, t = i + 1 >= 1.
        after = self.update_after
        return (i >= after - 1) & ((i - (after - 1)) % self.update_period == 0)

    def bias_at(self, i: int) -> float | None:
        """The bias weight ``alpha_t`` of call ``i`` in float64; None when it sets no output."""
        if not bool(self.updates_at(i)) or bool(self._snapshot(i)):
            return None
        return float(self._bias(i, np))


class BemaState(NamedTuple):
    """The state of a :func:`bema` transform: arrays only.

    Attributes:
      step: update calls so far (as :class:`ema_jax.EmaState`'s).
      ema: the weights to evaluate, ``mean + alpha_t * (params_t - theta0)`` as of the
        last update (TRL's ``running_model``; the initial weights before it).
      nonfinite_updates: as :class:`ema_jax.EmaState`'s.
      mean: the plain EMA of the weights since the snapshot.
      theta0: the weights at the snapshot.
    """

    step: jax.Array  # shape=(), int32
    ema: PyTree
    nonfinite_updates: jax.Array  # shape=(), int32
    mean: PyTree
    theta0: PyTree


@dataclasses.dataclass(frozen=True)
class Bema:
    """A BEMA of a parameter pytree; build it with :func:`bema`.

    The interface of :class:`ema_jax.Ema` (``init``, ``update``, ``average``,
    ``settings``, ``explain``): it goes where an ``Ema`` goes (``EmaTrainState``,
    ``ema_jax.nnx.Ema``, checkpoints). Immutable and hashable.
    """

    schedule: BemaSchedule
    ema_dtype: np.dtype | None = None
    nonfinite: Nonfinite = "skip"
    rounding: Rounding = "nearest"
    memory_kind: str | None = None
    core: Ema = dataclasses.field(init=False, repr=False, compare=False)
    """The plain EMA inside (``mean``), under ``schedule``."""

    several = False
    names = None
    state_class = BemaState

    def __post_init__(self) -> None:
        if not isinstance(self.schedule, BemaSchedule):
            raise TypeError(f"schedule must be a BemaSchedule, got {self.schedule!r:.60}")
        core = Ema(
            self.schedule,
            ema_dtype=self.ema_dtype,
            nonfinite=self.nonfinite,
            rounding=self.rounding,
            memory_kind=self.memory_kind,
        )
        object.__setattr__(self, "core", core)
        object.__setattr__(self, "ema_dtype", core.ema_dtype)
        object.__setattr__(self, "memory_kind", core.memory_kind)

    @property
    def schedules(self) -> tuple[Schedule, ...]:
        return (self.schedule,)

    @property
    def alpha(self) -> None:
        """None: the EMA's step size changes with the step."""
        return None

    @property
    def update_period(self) -> int:
        return self.schedule.update_period

    def average(self, ema: PyTree, which: int | str | None = None) -> PyTree:
        """``ema`` itself (one average): the weights to evaluate."""
        return self.core.average(ema, which)

    def settings(self) -> dict[str, Any]:
        """``{"schedule": {"name": "bema", ...}, "ema_dtype": ..., "nonfinite": ...}``."""
        return self.core.settings()

    def explain(self, **kwargs: Any) -> Any:
        """The report of the EMA inside (its ``beta_t``): :meth:`ema_jax.Ema.explain`."""
        return self.core.explain(**kwargs)

    def init(self, params: PyTree) -> BemaState:
        """Starts the output, the EMA and ``theta0`` as copies of ``params`` (three buffers)."""
        state = self.core.init(params)

        kind = self.memory_kind

        def copy(e: jax.Array, p: Any) -> jax.Array:  # in the EMA's memory, theta0 too
            new = jnp.array(e, copy=True)
            return new if kind is None else _memory.place(new, p, kind)

        return BemaState(
            step=state.step,
            ema=state.ema,
            nonfinite_updates=state.nonfinite_updates,
            mean=jax.tree.map(copy, state.ema, params),
            theta0=jax.tree.map(copy, state.ema, params),
        )

    def update(self, params: PyTree, state: BemaState) -> BemaState:
        """One call of TRL's ``on_step_end``: call it once after every optimizer step.

        At ``t = update_after`` (> 0) ``mean`` and ``theta0`` become ``params``; at
        every ``update_period``-th step after it ``mean`` moves by ``beta_t`` and
        ``ema`` becomes ``mean + alpha_t * (params - theta0)``. Other calls change
        nothing but ``step`` (``lax.cond``). With the guard, an entry whose result is
        NaN/Inf keeps its previous value, in ``mean`` and ``ema`` alike.
        """
        if not isinstance(state, BemaState):
            raise TypeError(
                f"state must be the BemaState that init returned, got {type(state).__name__}"
                " (the order is update(params, state))"
            )
        if self.memory_kind is not None:  # each buffer named (the core checks only mean)
            for name in ("ema", "mean", "theta0"):
                _memory.check_placed(getattr(state, name), self.memory_kind, f"state.{name}")
        i = jnp.asarray(state.step, jnp.int32)
        core = self.core.update(params, EmaState(state.step, state.mean, state.nonfinite_updates))
        params = _trees.check_params_match(params, state.ema)
        s = self.schedule
        snapshot = s._snapshot(i)

        def fold(params: PyTree, theta0: PyTree, out: PyTree) -> tuple[PyTree, PyTree]:
            bias = s._bias(i, jnp)

            def leaf(p: jax.Array, t0: jax.Array, m: jax.Array, e: jax.Array) -> jax.Array:
                if self.memory_kind in _memory.HOST_KINDS:  # through device memory
                    dev = _memory.to_device
                    return _memory.to_host(blend(p, dev(t0), dev(m), dev(e)))
                return blend(p, t0, m, e)

            def blend(p: jax.Array, t0: jax.Array, m: jax.Array, e: jax.Array) -> jax.Array:
                new = jnp.asarray(p, e.dtype)  # integer leaves: a copy
                if _trees.is_averaged(e):
                    ct = jnp.promote_types(e.dtype, jnp.float32)
                    new = m.astype(ct) + bias * (jnp.asarray(p, ct) - t0.astype(ct))
                    new = new.astype(e.dtype)
                    if self.nonfinite != "propagate":
                        new = jnp.where(jnp.isfinite(new), new, e)
                # The snapshot call sets the EMA and theta0, not the output (TRL).
                return new if snapshot is False else jnp.where(snapshot, e, new)

            new_out = jax.tree.map(leaf, params, theta0, core.ema, out)
            if snapshot is False:
                return theta0, new_out

            def snap(p: jax.Array, t0: jax.Array) -> jax.Array:
                host = self.memory_kind in _memory.HOST_KINDS
                t0 = _memory.to_device(t0) if host else t0
                new = jnp.asarray(p, t0.dtype)
                if self.nonfinite != "propagate" and _trees.is_averaged(t0):
                    new = jnp.where(jnp.isfinite(new), new, t0)  # as the EMA's own copy
                new = jnp.where(snapshot, new, t0)
                return _memory.to_host(new) if host else new

            return jax.tree.map(snap, params, theta0), new_out

        def skip(params: PyTree, theta0: PyTree, out: PyTree) -> tuple[PyTree, PyTree]:
            return theta0, out

        theta0, out = jax.lax.cond(s.updates_at(i), fold, skip, params, state.theta0, state.ema)
        return BemaState(
            step=core.step,
            ema=out,
            nonfinite_updates=core.nonfinite_updates,
            mean=core.ema,
            theta0=theta0,
        )


def bema(
    *,
    update_period: int = 400,
    ema_power: float = 0.5,
    bias_power: float = 0.2,
    lag: float = 10,
    update_after: int = 0,
    multiplier: float = 1.0,
    min_ema_multiplier: float = 0.0,
    ema_dtype: Any = None,
    nonfinite: Nonfinite = "skip",
    rounding: Rounding = "nearest",
    memory_kind: str | None = None,
) -> Bema:
    r"""BEMA, the bias-corrected EMA of model weights (Block & Zhang 2025; TRL's ``BEMACallback``).

    The weights to evaluate are the EMA plus a correction for its lag,

    .. math::
      \theta'_t = \text{EMA}_t + \alpha_t\,(\theta_t - \theta_0),\qquad
      \text{EMA}_t = (1 - \beta_t)\,\text{EMA}_{t-1} + \beta_t\,\theta_t,

    with :math:`\beta_t = \max((\rho + \gamma t)^{-\kappa}, \beta_\min)` and
    :math:`\alpha_t = (\rho + \gamma t)^{-\eta}` (see :class:`BemaSchedule`), updated
    every ``update_period`` steps after ``update_after``. Call ``i`` is TRL's
    ``global_step = i + 1``; the numbers are TRL's step for step (tests/test_bema.py).

    Cost: three parameter-sized buffers (``ema``, ``mean``, ``theta0``) where
    :func:`ema_jax.ema` keeps one; an update reads the parameters and the three buffers.

    Args:
      update_period: update every this many steps (TRL's ``update_freq``, :math:`\phi`).
      ema_power: :math:`\kappa`, the EMA's decay exponent (0: no averaging).
      bias_power: :math:`\eta`, the correction's decay exponent (0: no correction...
        the output is then ``EMA + theta_t - theta_0``).
      lag: :math:`\rho`, the schedule's offset in steps.
      update_after: :math:`\tau`, the burn-in: the EMA and ``theta0`` snapshot the
        weights at this step (0: at ``init``).
      multiplier: :math:`\gamma`, the speed of the schedule's clock (> 0).
      min_ema_multiplier: the smallest :math:`\beta_t`, in [0, 1].
      ema_dtype: dtype of the buffers' real floating leaves; None keeps each leaf's.
      nonfinite: the guard, as in :func:`ema_jax.ema`.
      rounding: ``"stochastic"`` rounds the plain EMA's low-precision leaves without
        bias, as in :func:`ema_jax.ema` (the output and ``theta0`` round to nearest).
      memory_kind: ``"pinned_host"`` keeps all three buffers in host memory, with the
        parameters' sharding, streamed through device memory leaf by leaf in the
        update, as in :func:`ema_jax.ema`.

    Returns:
      A :class:`Bema` with ``init(params)`` and ``update(params, state)``;
      ``state.ema`` holds the weights to evaluate.

    Raises:
      ValueError: a hyperparameter out of range, named with its value.

    Example:
      >>> import jax.numpy as jnp
      >>> import ema_jax
      >>> b = ema_jax.bema(update_period=1, lag=0, bias_power=0.5)
      >>> state = b.init({"w": jnp.zeros(2)})
      >>> state = b.update({"w": jnp.full(2, 4.0)}, state)  # t=1: beta=1, alpha=1
      >>> state.ema["w"], state.mean["w"]
      (Array([8., 8.], dtype=float32), Array([4., 4.], dtype=float32))
    """
    schedule = BemaSchedule(
        update_period=update_period,
        ema_power=ema_power,
        bias_power=bias_power,
        lag=lag,
        update_after=update_after,
        multiplier=multiplier,
        min_ema_multiplier=min_ema_multiplier,
    )
    return Bema(
        schedule,
        ema_dtype=ema_dtype,
        nonfinite=nonfinite,
        rounding=rounding,
        memory_kind=memory_kind,
    )

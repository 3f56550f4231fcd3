"""A constant decay, as timm, torch, optax (or flax ``nnx.EMA``), optionally debiased."""

from __future__ import annotations

import dataclasses
import math
from typing import Any
from typing import Literal

from ema_jax import _validate
from ema_jax.schedules._base import Scalar
from ema_jax.schedules._base import Schedule
from ema_jax.schedules._base import real
from ema_jax.schedules._base import register

Form = Literal["lerp", "nnx"]  # how an update blends: ema + alpha * (p - ema), or nnx.EMA's
FORMS: tuple[str, ...] = ("lerp", "nnx")


@register
@dataclasses.dataclass(frozen=True)
class Constant(Schedule):
    r"""A constant decay: every ``update_period`` calls, ``ema += (1 - decay) * (p - ema)``.

    The step size ``1 - decay`` is computed once, in float64 on the host, and applied as
    the lerp ``ema + alpha * (p - ema)`` (timm's and torch's ``lerp``): the average of a
    constant parameter is that parameter exactly, and after 30,000 float32 updates at
    decay 0.9999 it is within 2e-6 (of the trajectory's range) of the float64 average
    (tests/test_schedules.py). It is ``optax.incremental_update(new, old, 1 - decay)``
    and torch's ``get_ema_multi_avg_fn(decay)`` after its first call (which copies; see
    docs/migrating.md), up to rounding.

    ``form="nnx"`` blends instead in flax ``nnx.EMA``'s float operations and order
    (``flax/nnx/training/ema.py``: ``ema[...] = self.decay * ema + (1.0 - self.decay) *
    update``): with ``update_period=1`` and ``ema(..., nonfinite="propagate")`` (no
    guard, as ``nnx.EMA``) it is bit-identical to ``nnx.EMA(model, decay)`` under jit.
    With the default guard, XLA:CPU compiles the same expression followed by the
    guard's select to another fused multiply-add contraction: the two then differ by up
    to an ulp per update (tests/test_schedules.py measures both). That form rounds
    ``decay`` and ``1 - decay`` separately, so in float32 their sum is not exactly 1 and
    the average settles at ``(1 - decay) / (1 - fl(decay))`` times a constant parameter:
    off by 0.02% at decay 0.9999 and 1.3% at 0.999999 (:func:`ema_jax.explain` reports
    it as ``fixed_point_bias`` and warns above 0.1%). Pick it only to reproduce an
    ``nnx.EMA`` run bit for bit.

    ``debias=True`` gives the zero-initialised, bias-corrected EMA (Haiku's
    ``ExponentialMovingAverage(zero_debias=True)``, optax's ``bias_correction``) with
    no extra state: the u-th update (1-based) has step size

    .. math::
      \alpha_u = \frac{1 - \text{decay}}{1 - \text{decay}^u},

    so the first update copies the parameters and the average equals the zero-started
    EMA divided by :math:`1 - \text{decay}^u`.

    Args:
      decay: the weight of the old average, in [0, 1).
      update_period: update every this many calls (>= 1).
      debias: bias-correct the average as if it started from zeros.
      form: ``"lerp"`` (default, the accurate one) or ``"nnx"`` (flax ``nnx.EMA``'s
        two-weight blend, bit for bit; not with ``debias``).

    Example:
      >>> from ema_jax import schedules
      >>> s = schedules.constant(0.9)
      >>> round(s.alpha_at(5), 12)
      0.1
      >>> d = schedules.constant(0.9, debias=True)
      >>> d.alpha_at(0), round(d.alpha_at(1), 6)  # 0.1 / (1 - 0.81)
      (1.0, 0.526316)
      >>> schedules.constant(0.9999, form="nnx").settings()["form"]
      'nnx'
    """

    name = "constant"
    decay: float
    _: dataclasses.KW_ONLY
    update_period: int = 1
    debias: bool = False
    form: Form = "lerp"

    def __post_init__(self) -> None:
        s = object.__setattr__
        s(self, "decay", _validate.check_real_in("decay", self.decay, "[0, 1)"))
        super().__post_init__()  # update_period
        s(self, "debias", _validate.check_bool("debias", self.debias))
        s(self, "form", _validate.check_choice("form", self.form, FORMS))
        if self.debias and self.form == "nnx":
            raise ValueError(
                "form='nnx' (flax nnx.EMA's blend) has no debiased variant: pass"
                " debias=False or form='lerp'"
            )

    def step_size(self, i: Scalar, xp: Any) -> Any:
        if not self.debias:
            return 1.0 - self.decay
        updates = real(i // self.update_period + 1, xp)  # u, 1-based
        # 1 - decay**u, exact for decays near 1 (decay 0: log1p(-1) = -inf, a copy).
        log_decay = math.log(self.decay) if self.decay > 0.0 else -math.inf
        return (1.0 - self.decay) / -xp.expm1(updates * log_decay)

    def copies_at(self, i: Scalar, xp: Any) -> Any:
        return self.debias and i < self.update_period  # the first update of a debiased EMA

    def keep_weight(self) -> float | None:
        return self.decay if self.form == "nnx" else None  # nnx: the old EMA's own weight

    @classmethod
    def example(cls) -> Constant:
        return cls(0.999)


constant = Constant

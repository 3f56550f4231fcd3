"""EDM's EMAs, measured in samples: a half-life (EDM) and the power function (EDM2)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from ema_jax import _validate
from ema_jax.schedules._base import Scalar
from ema_jax.schedules._base import Schedule
from ema_jax.schedules._base import half_life_alpha
from ema_jax.schedules._base import real
from ema_jax.schedules._base import register
from ema_jax.schedules._base import steps_since_update

SIGMA_REL_OF_GAMMA_0 = math.sqrt(1.0 / 12.0)  # sigma_rel at gamma = 0: the widest profile


def sigma_rel_of_gamma(gamma: float) -> float:
    """EDM2's relative width of the power-function profile ``t**gamma``.

    ``sqrt((gamma + 1) / ((gamma + 2)**2 (gamma + 3)))`` (Karras et al. 2024, Eq. 3).

    Example:
      >>> from ema_jax import schedules
      >>> round(schedules.sigma_rel_of_gamma(6.94), 4)
      0.1
    """
    return math.sqrt((gamma + 1.0) / ((gamma + 2.0) ** 2 * (gamma + 3.0)))


def gamma_of_sigma_rel(sigma_rel: float) -> float:
    """The exponent whose profile has relative width ``sigma_rel``.

    The largest real root of ``g**3 + 7 g**2 + (16 - s**-2) g + (12 - s**-2)``, the
    equation ``sigma_rel_of_gamma(g) = s`` multiplied out (Karras et al. 2024, App. C.2).

    Example:
      >>> from ema_jax import schedules
      >>> round(schedules.gamma_of_sigma_rel(0.05), 2), round(schedules.gamma_of_sigma_rel(0.10), 2)
      (16.97, 6.94)
    """
    s2 = sigma_rel**-2
    roots = np.roots([1.0, 7.0, 16.0 - s2, 12.0 - s2])
    return float(max(r.real for r in roots if abs(r.imag) <= 1e-9 * max(1.0, abs(r.real))))


@register
@dataclasses.dataclass(frozen=True, kw_only=True)
class PowerFunction(Schedule):
    r"""EDM2's power-function EMA: the average weighs the parameters at time t as t**gamma.

    With ``t`` the samples seen after the optimizer step and ``dt`` the samples since
    the previous update, each update uses (Karras et al. 2024, Eq. 2)

    .. math::
      \beta = (1 - \Delta t / t)^{\gamma + 1},\qquad
      \text{ema} \leftarrow \beta\,\text{ema} + (1 - \beta)\,\text{params},

    so the first update copies, and after updates at sample counts
    :math:`t_1 < \dots < t_J` the average is :math:`\sum_j w_j\theta_j` with
    :math:`w_j \propto t_j^{\gamma+1} - t_{j-1}^{\gamma+1}`: the power function, also
    when updates are ``update_period`` steps apart (``dt`` counts the skipped steps;
    ema-pytorch's ``KarrasEMA`` does not). With ``update_period=1``, call ``i`` has
    :math:`\beta = (1 - 1/(i+1))^{\gamma+1}`. The batch size cancels in
    :math:`\Delta t/t`; it is kept for the report (samples).

    Exactly one of ``sigma_rel`` and ``gamma``: the profile's width relative to the
    elapsed training time is
    :math:`\sigma_\text{rel} = \sqrt{(\gamma+1)/((\gamma+2)^2(\gamma+3))}`
    (EDM2 uses 0.05 and 0.10: gamma 16.97 and 6.94).

    Args:
      sigma_rel: the relative width, in (0, sqrt(1/12)) so that gamma > 0.
      gamma: the exponent, > 0.
      batch_size: global batch size per optimizer step.
      update_period: update every this many calls (>= 1).

    Example:
      >>> from ema_jax import schedules
      >>> s = schedules.power_function(sigma_rel=0.10, batch_size=256)
      >>> round(s.exponent, 2), s.alpha_at(0)
      (6.94, 1.0)
      >>> round(s.alpha_at(1), 6) == round(1 - 0.5 ** (s.exponent + 1), 6)
      True
    """

    name = "power_function"
    sigma_rel: float | None = None
    gamma: float | None = None
    batch_size: float
    update_period: int = 1
    exponent: float = dataclasses.field(init=False, repr=False, compare=False)
    """gamma, given or solved from sigma_rel."""

    def __post_init__(self) -> None:
        s = object.__setattr__
        if (self.sigma_rel is None) == (self.gamma is None):
            raise ValueError(
                "power_function needs exactly one of sigma_rel and gamma, got"
                f" sigma_rel={self.sigma_rel!r} and gamma={self.gamma!r}"
            )
        if self.gamma is not None:
            s(self, "gamma", _validate.check_positive_real("gamma", self.gamma))
            s(self, "exponent", self.gamma)
        else:
            sigma_rel = _validate.check_positive_real("sigma_rel", self.sigma_rel)
            if sigma_rel >= SIGMA_REL_OF_GAMMA_0:
                raise ValueError(
                    f"sigma_rel must be below sqrt(1/12) = {SIGMA_REL_OF_GAMMA_0:.6f} (gamma > 0),"
                    f" got {self.sigma_rel!r}"
                )
            s(self, "sigma_rel", float(sigma_rel))
            s(self, "exponent", gamma_of_sigma_rel(sigma_rel))
        s(self, "batch_size", _validate.check_positive_real("batch_size", self.batch_size))
        super().__post_init__()  # update_period

    @property
    def relative_width(self) -> float:
        """sigma_rel, given or computed from gamma."""
        return sigma_rel_of_gamma(self.exponent)

    def step_size(self, i: Scalar, xp: Any) -> Any:
        ratio = steps_since_update(i, self.update_period, xp) / (real(i, xp) + 1.0)  # dt / t
        return -xp.expm1((self.exponent + 1.0) * xp.log1p(-ratio))  # 1 - beta, exact

    def copies_at(self, i: Scalar, xp: Any) -> Any:
        return i < self.update_period  # the first update: dt = t

    @classmethod
    def example(cls) -> PowerFunction:
        return cls(sigma_rel=0.05, batch_size=256)


@register
@dataclasses.dataclass(frozen=True, kw_only=True)
class Halflife(Schedule):
    r"""EDM's EMA: a half-life in samples, optionally ramped up with the samples seen.

    Each update uses :math:`\beta = 0.5^{\Delta t / h}` with :math:`\Delta t` the
    samples since the previous update and :math:`h` = ``halflife_samples``, or
    :math:`\min(\text{halflife\_samples}, \text{rampup\_ratio}\cdot t)` with a
    ramp-up, ``t`` the samples seen before this step (EDM's ``cur_nimg`` at its EMA
    update, ``training/training_loop.py``), so that call 0 copies. The half-life does
    not depend on the batch size: exactly batch-size invariant.

    Args:
      halflife_samples: the half-life in samples (EDM: ``ema_halflife_kimg * 1000``).
      batch_size: global batch size per optimizer step.
      rampup_ratio: None, or the ramp-up's ratio (EDM's default 0.05).
      update_period: update every this many calls (>= 1).

    Example:
      >>> from ema_jax import schedules
      >>> s = schedules.halflife(halflife_samples=500_000, batch_size=512)
      >>> round(s.alpha_at(0), 8) == round(1 - 0.5 ** (512 / 500_000), 8)
      True
    """

    name = "halflife"
    halflife_samples: float
    batch_size: float
    rampup_ratio: float | None = None
    update_period: int = 1

    def __post_init__(self) -> None:
        s = object.__setattr__
        v = _validate
        s(
            self,
            "halflife_samples",
            v.check_positive_real("halflife_samples", self.halflife_samples),
        )
        s(self, "batch_size", v.check_positive_real("batch_size", self.batch_size))
        if self.rampup_ratio is not None:
            s(self, "rampup_ratio", v.check_positive_real("rampup_ratio", self.rampup_ratio))
        super().__post_init__()  # update_period

    def step_size(self, i: Scalar, xp: Any) -> Any:
        dt = steps_since_update(i, self.update_period, xp) * self.batch_size
        h: Any = self.halflife_samples
        if self.rampup_ratio is not None:
            h = xp.minimum(h, self.rampup_ratio * self.batch_size * real(i, xp))
        return half_life_alpha(dt, h, xp)  # h = 0 (call 0, ramped): 1, a copy

    def copies_at(self, i: Scalar, xp: Any) -> Any:
        return self.rampup_ratio is not None and i == 0

    @classmethod
    def example(cls) -> Halflife:
        return cls(halflife_samples=1e5, batch_size=256, rampup_ratio=0.05)


halflife = Halflife
power_function = PowerFunction

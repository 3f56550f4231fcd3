"""Decays that warm up from 0: timm / ema-pytorch / diffusers' power warmup, and TF's."""

from __future__ import annotations

import dataclasses
from typing import Any

from ema_jax import _validate
from ema_jax.schedules._base import Scalar
from ema_jax.schedules._base import Schedule
from ema_jax.schedules._base import real
from ema_jax.schedules._base import register


def _check_common(schedule: Any) -> None:
    s = object.__setattr__
    v = _validate
    s(schedule, "decay", v.check_real_in("decay", schedule.decay, "[0, 1)"))
    min_decay = v.check_real_in("min_decay", schedule.min_decay, "[0, 1)")
    if min_decay > schedule.decay:
        raise ValueError(
            f"min_decay must be at most decay={schedule.decay!r}, got {schedule.min_decay!r}"
        )
    s(schedule, "min_decay", min_decay)
    after = v.check_nonnegative_int("update_after_step", schedule.update_after_step)
    s(schedule, "update_after_step", after)
    Schedule.__post_init__(schedule)  # update_period


class _Warmup(Schedule):
    """Shared by both warmups: ``t = i - update_after_step``; copy while ``t <= 0``."""

    decay: float
    min_decay: float
    update_after_step: int

    def _t(self, i: Scalar, xp: Any) -> Any:
        return real(i, xp) - self.update_after_step

    def copies_at(self, i: Scalar, xp: Any) -> Any:
        return i <= self.update_after_step

    def _warm_alpha(self, t: Any) -> Any:
        """``1 - decay_t`` before the clip, computed directly (exact near decay 1)."""
        raise NotImplementedError

    def step_size(self, i: Scalar, xp: Any) -> Any:
        t = xp.maximum(self._t(i, xp), 1.0)  # copies where t <= 0 (see copies_at)
        return xp.clip(self._warm_alpha(t), 1.0 - self.decay, 1.0 - self.min_decay)


@register
@dataclasses.dataclass(frozen=True, kw_only=True)
class WarmupPower(_Warmup):
    r"""A decay that warms up as a power of the step: timm, ema-pytorch and diffusers.

    At call ``i`` (0-based), with :math:`t = i - \text{update\_after\_step}`, the EMA
    copies the parameters while :math:`t \le 0`, and then

    .. math::
      \text{decay}_t = \operatorname{clip}\left(1 - (1 + t/\text{inv\_gamma})^{-\text{power}},
      \text{min\_decay}, \text{decay}\right).

    This is the decay of timm's ``ModelEmaV3(use_warmup=True)``, ema-pytorch's ``EMA``
    and diffusers' ``EMAModel(use_ema_warmup=True)`` at their update that follows our
    call ``i`` (the step counters they pass are ``i + 1``; see tests/support/anchors.py for the
    transcriptions and their line numbers).

    Args:
      decay: the largest decay, reached as ``t`` grows; in [0, 1).
      inv_gamma: the warmup's time scale in steps (> 0).
      power: the warmup's exponent (> 0); 2/3 for ~1M-step runs, 3/4 for shorter ones.
      min_decay: the smallest decay after the copy phase, in [0, decay].
      update_after_step: calls that copy before averaging starts (call 0 always copies).
      update_period: update every this many calls (>= 1).

    Example:
      >>> from ema_jax import schedules
      >>> s = schedules.warmup_power(decay=0.999, power=0.5)
      >>> s.alpha_at(0), round(s.alpha_at(3), 6)  # 1 - (1 - 4 ** -0.5)
      (1.0, 0.5)
    """

    name = "warmup_power"
    decay: float = 0.9999
    inv_gamma: float = 1.0
    power: float = 2.0 / 3.0
    min_decay: float = 0.0
    update_after_step: int = 0
    update_period: int = 1

    def __post_init__(self) -> None:
        _check_common(self)
        s = object.__setattr__
        s(self, "inv_gamma", _validate.check_positive_real("inv_gamma", self.inv_gamma))
        s(self, "power", _validate.check_positive_real("power", self.power))

    def _warm_alpha(self, t: Any) -> Any:
        return (1.0 + t / self.inv_gamma) ** -self.power


@register
@dataclasses.dataclass(frozen=True)
class TfWarmup(_Warmup):
    r"""TensorFlow's warmup of the decay: ``min(decay, (1 + t) / (10 + t))``.

    At call ``i`` (0-based), with :math:`t = i - \text{update\_after\_step}`, the EMA
    copies the parameters while :math:`t \le 0`, and then uses
    :math:`\max(\text{min\_decay}, \min(\text{decay}, (1 + t)/(10 + t)))`: TF's
    ``ExponentialMovingAverage(decay, num_updates=t)``, praxis, and diffusers'
    ``EMAModel`` default (``use_ema_warmup=False``).

    Args:
      decay: the largest decay; in [0, 1).
      min_decay: the smallest decay after the copy phase, in [0, decay].
      update_after_step: calls that copy before averaging starts (call 0 always copies).
      update_period: update every this many calls (>= 1).

    Example:
      >>> from ema_jax import schedules
      >>> s = schedules.tf_warmup(0.999)
      >>> s.alpha_at(0), round(s.alpha_at(1), 6)  # 1 - 2 / 11
      (1.0, 0.818182)
    """

    name = "tf_warmup"
    decay: float
    _: dataclasses.KW_ONLY
    update_after_step: int = 0
    min_decay: float = 0.0
    update_period: int = 1

    def __post_init__(self) -> None:
        _check_common(self)

    def _warm_alpha(self, t: Any) -> Any:
        return 9.0 / (10.0 + t)  # 1 - (1 + t) / (10 + t)

    @classmethod
    def example(cls) -> TfWarmup:
        return cls(0.999)


warmup_power = WarmupPower
tf_warmup = TfWarmup

"""pycls's normalized EMA: a step size fixed by batch size, update period and schedule length."""

from __future__ import annotations

import dataclasses
import math
from typing import Any
from typing import Literal

from ema_jax import _validate
from ema_jax.schedules._base import Scalar
from ema_jax.schedules._base import Schedule
from ema_jax.schedules._base import register

Rule = Literal["linear", "exact"]
RULES: tuple[str, ...] = ("linear", "exact")


def alpha_linear(
    ema_alpha: float, batch_size: float, max_epoch: float, update_period: int
) -> float:
    """pycls's per-update step size: ``min(1, ema_alpha * batch_size / max_epoch * k)``.

    The operations are done in pycls's order (``pycls/core/net.py``,
    ``update_model_ema``: ``adjust = cfg.TRAIN.BATCH_SIZE / cfg.OPTIM.MAX_EPOCH * update_period``;
    ``alpha = min(1.0, cfg.OPTIM.EMA_ALPHA * adjust)``), so the float is bit-identical.
    An ``ema_alpha`` of 0 is a frozen EMA (0), even where ``adjust`` overflows.
    """
    if ema_alpha == 0.0:
        return 0.0
    adjust = batch_size / max_epoch * update_period
    return min(1.0, ema_alpha * adjust)


def alpha_exact(ema_alpha: float, batch_size: float, max_epoch: float, update_period: int) -> float:
    """The exact step size with the same per-sample history as the linear rule.

    ``1 - (1 - ema_alpha / max_epoch) ** (batch_size * update_period)``, computed
    as ``-expm1(n * k * log1p(-r))`` so that tiny rates do not round away; 1.0 when
    the per-sample rate ``r = ema_alpha / max_epoch`` is 1 or more, 0.0 when it is 0.
    """
    rate = ema_alpha / max_epoch
    if rate >= 1.0:
        return 1.0
    if rate == 0.0:
        return 0.0
    return -math.expm1(batch_size * update_period * math.log1p(-rate))


@register
@dataclasses.dataclass(frozen=True, kw_only=True)
class Pycls(Schedule):
    r"""pycls's EMA: a per-update step size normalized by batch size and schedule length.

    .. math::
      \alpha = \min\left(1, \text{ema\_alpha}\cdot\frac{\text{batch\_size}}
               {\text{max\_epoch}}\cdot\text{update\_period}\right)

    (``rule="linear"``, pycls) or :math:`1 - (1 - \text{ema\_alpha}/\text{max\_epoch})
    ^{\text{batch\_size}\cdot\text{update\_period}}` (``rule="exact"``: the same
    history without the small-step approximation or the clamp). Call ``i`` does what
    pycls's ``update_model_ema`` does at ``cur_epoch = i // steps_per_epoch``,
    ``cur_iter = i % steps_per_epoch`` (``pycls/core/trainer.py``, ``train_epoch``;
    ``cur_iter = i`` and no warmup when ``steps_per_epoch`` is None): it updates when
    ``update_period > 0`` and ``cur_iter % update_period == 0``, and copies the
    parameters while ``cur_epoch < warmup_epochs``.

    Args:
      ema_alpha: base rate per sample and epoch of schedule, pycls's ``EMA_ALPHA``
        (1e-5 for ImageNet, 2.5e-4 for CIFAR recipes); 0 freezes the EMA.
      batch_size: global batch size, all devices together, per optimizer step.
      max_epoch: schedule length in epochs. A fraction is accepted (a run that ends
        mid-epoch); pycls's ``MAX_EPOCH`` is an integer, and :func:`ema_jax.explain`
        notes a fractional one (tag ``epochs:``).
      update_period: update every this many optimizer steps (0 turns the EMA off).
      warmup_epochs: epochs during which the EMA copies the parameters.
      steps_per_epoch: optimizer steps per epoch; needed for warmup and for the
        per-epoch cadence. None counts the cadence over the whole run.
      rule: "linear" (pycls) or "exact".

    Example:
      >>> from ema_jax import schedules
      >>> s = schedules.pycls(ema_alpha=2.5e-4, batch_size=1024, max_epoch=50)
      >>> round(s.static_alpha, 5), s.alpha_at(0), s.alpha_at(1)
      (0.16384, 0.16384, None)
    """

    name = "pycls"
    min_update_period = 0  # 0 turns the EMA off, as in pycls
    ema_alpha: float
    batch_size: float
    max_epoch: float
    update_period: int = 32
    warmup_epochs: int = 0
    steps_per_epoch: int | None = None
    rule: Rule = "linear"

    def __post_init__(self) -> None:
        s = object.__setattr__
        v = _validate
        s(self, "ema_alpha", v.check_nonnegative_real("ema_alpha", self.ema_alpha))
        s(self, "batch_size", v.check_positive_real("batch_size", self.batch_size))
        s(self, "max_epoch", v.check_positive_real("max_epoch", self.max_epoch))
        super().__post_init__()  # update_period
        w = v.check_nonnegative_int("warmup_epochs", self.warmup_epochs)
        s(self, "warmup_epochs", w)
        if self.steps_per_epoch is not None:
            s(
                self,
                "steps_per_epoch",
                v.check_positive_int("steps_per_epoch", self.steps_per_epoch),
            )
        elif w > 0:
            raise ValueError(
                f"warmup_epochs={w!r} needs steps_per_epoch to know where epochs end,"
                " got steps_per_epoch=None"
            )
        s(self, "rule", v.check_choice("rule", self.rule, RULES))
        v.check_alpha(
            self.alpha,
            f"ema_alpha={self.ema_alpha!r}, batch_size={self.batch_size!r},"
            f" max_epoch={self.max_epoch!r}, update_period={self.update_period!r}"
            f" and rule={self.rule!r}",
        )

    @property
    def alpha(self) -> float:
        """The per-update step size under ``rule``, a Python float."""
        fn = alpha_linear if self.rule == "linear" else alpha_exact
        return fn(self.ema_alpha, self.batch_size, self.max_epoch, self.update_period)

    def step_size(self, i: Scalar, xp: Any) -> float:
        return self.alpha

    def updates_at(self, i: Scalar) -> Any:
        spe = self.steps_per_epoch
        return super().updates_at(i if spe is None else i % spe)

    def copies_at(self, i: Scalar, xp: Any) -> Any:
        if not self.warmup_epochs:
            return False
        assert self.steps_per_epoch is not None  # checked at construction
        return i // self.steps_per_epoch < self.warmup_epochs

    @classmethod
    def example(cls) -> Pycls:
        return cls(
            ema_alpha=2.5e-4, batch_size=128, max_epoch=100, warmup_epochs=1, steps_per_epoch=390
        )


pycls = Pycls

"""Step-size rules and hyperparameter validation: pure Python, no JAX.

Everything here is resolved once, when a transform is built, so that the jitted
update sees only Python constants.
"""

from __future__ import annotations

import math
import numbers
from typing import Any
from typing import Literal

Rule = Literal["linear", "exact"]
RULES: tuple[str, ...] = ("linear", "exact")
INT32_MAX = 2**31 - 1


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _plain(value: numbers.Real) -> float:
    """A NumPy scalar as the Python int or float of the same value."""
    return int(value) if isinstance(value, numbers.Integral) else float(value)


def check_nonnegative_real(name: str, value: Any) -> float:
    """Returns ``value`` as a Python number, or raises if it is not finite and >= 0."""
    if not _is_real(value) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return _plain(value)


def check_positive_real(name: str, value: Any) -> float:
    """Returns ``value`` as a Python number, or raises if it is not finite and > 0."""
    if not _is_real(value) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return _plain(value)


def check_nonnegative_int(name: str, value: Any) -> int:
    """Returns ``value`` as an int, or raises if it is not an integer in [0, 2**31)."""
    if not _is_int(value) or not 0 <= value <= INT32_MAX:
        raise ValueError(f"{name} must be an integer in [0, 2**31 - 1], got {value!r}")
    return int(value)


def check_positive_int(name: str, value: Any) -> int:
    """Returns ``value`` as an int, or raises if it is not an integer in [1, 2**31)."""
    if not _is_int(value) or not 1 <= value <= INT32_MAX:
        raise ValueError(f"{name} must be an integer in [1, 2**31 - 1], got {value!r}")
    return int(value)


def check_rule(rule: Any) -> Rule:
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    return rule


def alpha_linear(
    ema_alpha: float, batch_size: float, max_epoch: float, update_period: int
) -> float:
    """pycls's per-update step size: ``min(1, ema_alpha * batch_size / max_epoch * k)``.

    The operations are done in pycls's order, so the float is bit-identical to
    the one pycls computes.
    """
    adjust = batch_size / max_epoch * update_period
    return min(1.0, ema_alpha * adjust)


def alpha_exact(ema_alpha: float, batch_size: float, max_epoch: float, update_period: int) -> float:
    """The exact step size with the same per-sample history as the linear rule.

    ``1 - (1 - ema_alpha / max_epoch) ** (batch_size * update_period)``, computed
    as ``-expm1(n * k * log1p(-r))`` so that tiny rates do not round away, and
    1.0 when the per-sample rate ``r = ema_alpha / max_epoch`` is 1 or more.
    """
    rate = ema_alpha / max_epoch
    if rate >= 1.0:
        return 1.0
    return -math.expm1(batch_size * update_period * math.log1p(-rate))


def resolve_alpha(
    rule: Rule, ema_alpha: float, batch_size: float, max_epoch: float, update_period: int
) -> float:
    """The per-update step size under ``rule`` ("linear" or "exact")."""
    fn = alpha_linear if rule == "linear" else alpha_exact
    return fn(ema_alpha, batch_size, max_epoch, update_period)

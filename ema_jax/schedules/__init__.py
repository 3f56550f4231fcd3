"""Step-size schedules for :func:`ema_jax.ema`: one family per module.

Each schedule says, for update call ``i`` (0-based, ``EmaState.step`` before the
call), whether the EMA updates and with which step size ``alpha``
(``ema <- ema + alpha * (params - ema)``; 1 is a copy).

A family is a :class:`Schedule` subclass registered with :func:`register`, which adds
it to :data:`REGISTRY` (what the command line offers and the tests iterate); the
protocol, and a family written outside the package, are in ``docs/schedules.md``.
"""

from ema_jax.schedules._base import REGISTRY
from ema_jax.schedules._base import Plan
from ema_jax.schedules._base import Schedule
from ema_jax.schedules._base import real
from ema_jax.schedules._base import register
from ema_jax.schedules._base import steps_since_update
from ema_jax.schedules._constant import Constant
from ema_jax.schedules._constant import constant
from ema_jax.schedules._edm import Halflife
from ema_jax.schedules._edm import PowerFunction
from ema_jax.schedules._edm import gamma_of_sigma_rel
from ema_jax.schedules._edm import halflife
from ema_jax.schedules._edm import power_function
from ema_jax.schedules._edm import sigma_rel_of_gamma
from ema_jax.schedules._fraction import FractionOfTraining
from ema_jax.schedules._fraction import fraction_of_training
from ema_jax.schedules._pycls import Pycls
from ema_jax.schedules._pycls import pycls
from ema_jax.schedules._warmup import TfWarmup
from ema_jax.schedules._warmup import WarmupPower
from ema_jax.schedules._warmup import tf_warmup
from ema_jax.schedules._warmup import warmup_power

__all__ = [
    "REGISTRY",
    "Constant",
    "FractionOfTraining",
    "Halflife",
    "Plan",
    "PowerFunction",
    "Pycls",
    "Schedule",
    "TfWarmup",
    "WarmupPower",
    "constant",
    "fraction_of_training",
    "gamma_of_sigma_rel",
    "halflife",
    "power_function",
    "pycls",
    "real",
    "register",
    "sigma_rel_of_gamma",
    "steps_since_update",
    "tf_warmup",
    "warmup_power",
]

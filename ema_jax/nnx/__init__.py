"""ema_jax for Flax NNX: `Ema`, a drop-in for `nnx.EMA` driven by an ema_jax transform."""

from ema_jax.nnx._ema import Ema
from ema_jax.nnx._ema import EmaCount

__all__ = [
    "Ema",
    "EmaCount",
]

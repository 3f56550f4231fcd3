"""ema_jax for Flax NNX: `Ema`, a drop-in for `nnx.EMA` driven by an ema_jax transform."""

from ema_jax.nnx._ema import Ema
from ema_jax.nnx._ema import EmaCount
from ema_jax.nnx._precise_bn import precise_batch_stats
from ema_jax.nnx._precise_bn import recompute_batch_stats

__all__ = [
    "Ema",
    "EmaCount",
    "precise_batch_stats",
    "recompute_batch_stats",
]

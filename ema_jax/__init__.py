"""ema_jax: pycls's normalized exponential moving average of weights, for JAX/Flax."""

from ema_jax._report import EmaReport
from ema_jax._report import explain
from ema_jax._transform import EmaState
from ema_jax._transform import NormalizedEma
from ema_jax._transform import normalized_ema
from ema_jax.linen import BestCheckpoints
from ema_jax.linen import EmaTrainState
from ema_jax.linen import precise_batch_stats
from ema_jax.linen import restore_checkpoint

__version__ = "0.1.0"

__all__ = [
    "BestCheckpoints",
    "EmaReport",
    "EmaState",
    "EmaTrainState",
    "NormalizedEma",
    "explain",
    "normalized_ema",
    "precise_batch_stats",
    "restore_checkpoint",
]

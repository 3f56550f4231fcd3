"""ema_jax: pycls's normalized exponential moving average of weights, for JAX/Flax."""

from ema_jax._checkpoint import BestCheckpoints
from ema_jax._checkpoint import restore_checkpoint
from ema_jax._explain import EmaReport
from ema_jax._explain import explain
from ema_jax._train_state import EmaTrainState
from ema_jax._transform import EmaState
from ema_jax._transform import NormalizedEma
from ema_jax._transform import normalized_ema

__version__ = "0.1.0"

__all__ = [
    "BestCheckpoints",
    "EmaReport",
    "EmaState",
    "EmaTrainState",
    "NormalizedEma",
    "explain",
    "normalized_ema",
    "restore_checkpoint",
]

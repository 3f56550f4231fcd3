"""ema_jax: pycls's normalized exponential moving average of weights, for JAX/Flax."""

from ema_jax._report import EmaReport
from ema_jax._report import explain
from ema_jax._transform import EmaState
from ema_jax._transform import NormalizedEma
from ema_jax._transform import normalized_ema
from ema_jax.linen import BestCheckpoints
from ema_jax.linen import CorruptCheckpointError
from ema_jax.linen import EmaSettingsMismatchError
from ema_jax.linen import EmaTrainState
from ema_jax.linen import restore_checkpoint
from ema_jax.linen import save_checkpoint

__version__ = "0.1.0"

__all__ = [
    "BestCheckpoints",
    "CorruptCheckpointError",
    "EmaReport",
    "EmaSettingsMismatchError",
    "EmaState",
    "EmaTrainState",
    "NormalizedEma",
    "explain",
    "normalized_ema",
    "restore_checkpoint",
    "save_checkpoint",
]

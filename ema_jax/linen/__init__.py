"""ema_jax for Flax linen: a train state that carries the EMA, its orbax checkpoints, and
precise BatchNorm statistics."""

from ema_jax._checkpoint import CorruptCheckpointError
from ema_jax._checkpoint import EmaSettingsMismatchError
from ema_jax.linen._best import BestCheckpoints
from ema_jax.linen._checkpoint import restore_checkpoint
from ema_jax.linen._checkpoint import save_checkpoint
from ema_jax.linen._precise_bn import precise_batch_stats
from ema_jax.linen._train_state import EmaTrainState

__all__ = [
    "BestCheckpoints",
    "CorruptCheckpointError",
    "EmaSettingsMismatchError",
    "EmaTrainState",
    "precise_batch_stats",
    "restore_checkpoint",
    "save_checkpoint",
]

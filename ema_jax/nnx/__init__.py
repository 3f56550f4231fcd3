"""ema_jax for Flax NNX: `Ema`, a drop-in for `nnx.EMA` driven by an ema_jax transform, and
verified orbax checkpoints of NNX objects."""

from ema_jax._checkpoint import CorruptCheckpointError
from ema_jax._checkpoint import EmaSettingsMismatchError
from ema_jax.nnx._checkpoint import restore_checkpoint
from ema_jax.nnx._checkpoint import save_checkpoint
from ema_jax.nnx._ema import Ema
from ema_jax.nnx._ema import EmaCount
from ema_jax.nnx._precise_bn import precise_batch_stats
from ema_jax.nnx._precise_bn import recompute_batch_stats

__all__ = [
    "CorruptCheckpointError",
    "Ema",
    "EmaCount",
    "EmaSettingsMismatchError",
    "precise_batch_stats",
    "recompute_batch_stats",
    "restore_checkpoint",
    "save_checkpoint",
]

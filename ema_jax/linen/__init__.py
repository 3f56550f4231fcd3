"""ema_jax for Flax linen: a train state that carries the EMA, and its orbax checkpoints."""

from ema_jax.linen._checkpoint import BestCheckpoints
from ema_jax.linen._checkpoint import restore_checkpoint
from ema_jax.linen._train_state import EmaTrainState

__all__ = [
    "BestCheckpoints",
    "EmaTrainState",
    "restore_checkpoint",
]

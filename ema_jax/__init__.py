"""ema_jax: the exponential moving average of model weights for JAX/Flax, under any schedule."""

from ema_jax import posthoc
from ema_jax import schedules
from ema_jax._normalized import NormalizedEma
from ema_jax._normalized import normalized_ema
from ema_jax._report import EmaReport
from ema_jax._report import explain
from ema_jax._report_schedule import ScheduleReport
from ema_jax._transform import Ema
from ema_jax._transform import EmaState
from ema_jax._transform import ema
from ema_jax._validate import EmaPrecisionWarning
from ema_jax.linen import BestCheckpoints
from ema_jax.linen import CorruptCheckpointError
from ema_jax.linen import EmaSettingsMismatchError
from ema_jax.linen import EmaTrainState
from ema_jax.linen import precise_batch_stats
from ema_jax.linen import restore_checkpoint
from ema_jax.linen import save_checkpoint

__version__ = "0.2.0"

__all__ = [
    "BestCheckpoints",
    "CorruptCheckpointError",
    "Ema",
    "EmaPrecisionWarning",
    "EmaReport",
    "EmaSettingsMismatchError",
    "EmaState",
    "EmaTrainState",
    "NormalizedEma",
    "ScheduleReport",
    "ema",
    "explain",
    "normalized_ema",
    "posthoc",
    "precise_batch_stats",
    "restore_checkpoint",
    "save_checkpoint",
    "schedules",
]

"""ema_jax: the exponential moving average of model weights for JAX/Flax, under any schedule.

``import ema_jax`` loads only the core (the transform, the schedules and
:func:`explain`); the names that need Flax or orbax (the linen train state and
checkpoints, :mod:`ema_jax.posthoc`) load on first use, through the table ``_LAZY``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING
from typing import Any

from ema_jax import schedules
from ema_jax._bema import bema
from ema_jax._explain import AveragesReport
from ema_jax._explain import EmaReport
from ema_jax._explain import Report
from ema_jax._explain import ScheduleReport
from ema_jax._explain import explain
from ema_jax._normalized import NormalizedEma
from ema_jax._normalized import normalized_ema
from ema_jax._transform import Ema
from ema_jax._transform import EmaState
from ema_jax._transform import ema
from ema_jax._validate import EmaPrecisionWarning

if TYPE_CHECKING:  # what _LAZY loads on first use, for type checkers
    from ema_jax import linen as linen
    from ema_jax import nnx as nnx
    from ema_jax import posthoc
    from ema_jax._checkpoint import CorruptCheckpointError
    from ema_jax._checkpoint import EmaSettingsMismatchError
    from ema_jax.linen import BestCheckpoints
    from ema_jax.linen import EmaTrainState
    from ema_jax.linen import precise_batch_stats
    from ema_jax.linen import restore_checkpoint
    from ema_jax.linen import save_checkpoint

__version__ = "0.3.0"

# name -> (module, attribute in it; None: the module itself). Loaded on first use.
_LAZY: dict[str, tuple[str, str | None]] = {
    "linen": ("ema_jax.linen", None),
    "nnx": ("ema_jax.nnx", None),
    "posthoc": ("ema_jax.posthoc", None),
    "BestCheckpoints": ("ema_jax.linen", "BestCheckpoints"),
    "CorruptCheckpointError": ("ema_jax._checkpoint", "CorruptCheckpointError"),
    "EmaSettingsMismatchError": ("ema_jax._checkpoint", "EmaSettingsMismatchError"),
    "EmaTrainState": ("ema_jax.linen", "EmaTrainState"),
    "precise_batch_stats": ("ema_jax.linen", "precise_batch_stats"),
    "restore_checkpoint": ("ema_jax.linen", "restore_checkpoint"),
    "save_checkpoint": ("ema_jax.linen", "save_checkpoint"),
}

__all__ = [
    "AveragesReport",
    "BestCheckpoints",
    "CorruptCheckpointError",
    "Ema",
    "EmaPrecisionWarning",
    "EmaReport",
    "EmaSettingsMismatchError",
    "EmaState",
    "EmaTrainState",
    "NormalizedEma",
    "Report",
    "ScheduleReport",
    "bema",
    "ema",
    "explain",
    "normalized_ema",
    "posthoc",
    "precise_batch_stats",
    "restore_checkpoint",
    "save_checkpoint",
    "schedules",
]


def __getattr__(name: str) -> Any:
    """Loads a name of ``_LAZY`` on first use (PEP 562) and keeps it in the module."""
    if name not in _LAZY:
        raise AttributeError(f"module 'ema_jax' has no attribute {name!r}")
    module, attribute = _LAZY[name]
    value = importlib.import_module(module)
    if attribute is not None:
        value = getattr(value, attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | set(__all__))

"""Post-hoc EMA (EDM2): choose the EMA's length after training.

Keep power-function EMAs at two or more ``sigma_rel`` (:func:`trackers`), save
snapshots of them every few steps (:class:`Snapshots`), and after training
:func:`reconstruct` the EMA of any ``sigma_rel`` at any snapshot step by least squares
over the snapshots' profiles (:func:`coefficients`, :func:`solve`). Host-side NumPy,
float64; docs/posthoc.md explains the method and its costs.
"""

from ema_jax.posthoc._checks import MAX_RESIDUAL
from ema_jax.posthoc._checks import WARN_RESIDUAL
from ema_jax.posthoc._checks import ExtrapolationError
from ema_jax.posthoc._checks import ExtrapolationWarning
from ema_jax.posthoc._format import Average
from ema_jax.posthoc._format import SnapshotInfo
from ema_jax.posthoc._format import SnapshotMismatchError
from ema_jax.posthoc._format import SnapshotNotFoundError
from ema_jax.posthoc._format import list_snapshots
from ema_jax.posthoc._math import Solution
from ema_jax.posthoc._math import profile_inner
from ema_jax.posthoc._math import solve
from ema_jax.posthoc._reconstruct import Coefficients
from ema_jax.posthoc._reconstruct import coefficients
from ema_jax.posthoc._reconstruct import reconstruct
from ema_jax.posthoc._snapshots import Snapshots
from ema_jax.posthoc._snapshots import trackers

__all__ = [
    "MAX_RESIDUAL",
    "WARN_RESIDUAL",
    "Average",
    "Coefficients",
    "ExtrapolationError",
    "ExtrapolationWarning",
    "SnapshotInfo",
    "SnapshotMismatchError",
    "SnapshotNotFoundError",
    "Snapshots",
    "Solution",
    "coefficients",
    "list_snapshots",
    "profile_inner",
    "reconstruct",
    "solve",
    "trackers",
]

"""Post-hoc EMA's math: power-function profiles, their inner products, the least squares.

Host-side float64 NumPy. EDM2 (Karras et al., CVPR 2024, Sec. 3 and App. C.2,
Algorithm 3), written from the paper's equations.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike

from ema_jax import _validate
from ema_jax.schedules import _edm


class Solution(NamedTuple):
    """The least-squares weights of snapshots that best match one target profile.

    Attributes:
      weights: one per snapshot, summing to 1 (float64).
      residual: ``||sum_i weights_i p_i - p_target|| / ||p_target||``, the relative L2
        error of the reconstructed weighting over time (0: exact), accurate to about
        1e-7 (it is the square root of a difference of numbers near 1).
      cond: the 2-norm condition number of the matrix the solve factors (``A`` scaled
        to unit diagonal).
      rank: the effective rank lstsq used (below ``len(weights)``: directions the
        snapshots cannot tell apart were dropped, the minimum-norm solution).
    """

    weights: np.ndarray  # shape=(N,), float64
    residual: float
    cond: float
    rank: int


def profile_inner(
    t_a: ArrayLike, gamma_a: ArrayLike, t_b: ArrayLike, gamma_b: ArrayLike
) -> np.ndarray:
    r"""The L2 inner product of two power-function profiles, elementwise (broadcasting).

    The profile of an EMA of exponent :math:`\gamma` read at time :math:`t` (samples
    seen) weighs the parameters at time :math:`\tau` by
    :math:`p(\tau) = (\gamma+1)\,\tau^\gamma / t^{\gamma+1}` on :math:`(0, t]`, so

    .. math::
      \langle p_a, p_b\rangle = \frac{(\gamma_a+1)(\gamma_b+1)\,(t_a/t_b)^e}
        {(\gamma_a+\gamma_b+1)\max(t_a, t_b)},\qquad
      e = \gamma_b \text{ if } t_a < t_b \text{ else } -\gamma_a.

    Example:
      >>> from ema_jax import posthoc
      >>> float(posthoc.profile_inner(10.0, 2.0, 10.0, 2.0))  # (g+1)**2 / ((2g+1) t)
      0.18
    """
    t_a, gamma_a, t_b, gamma_b = (np.asarray(x, np.float64) for x in (t_a, gamma_a, t_b, gamma_b))
    exponent = np.where(t_a < t_b, gamma_b, -gamma_a)
    numerator = (gamma_a + 1.0) * (gamma_b + 1.0) * (t_a / t_b) ** exponent
    return numerator / ((gamma_a + gamma_b + 1.0) * np.maximum(t_a, t_b))


def _check_profiles(times: ArrayLike, gammas: ArrayLike) -> tuple[np.ndarray, ...]:
    t = np.asarray(times, np.float64).reshape(-1)
    g = np.asarray(gammas, np.float64).reshape(-1)
    if t.size == 0 or t.shape != g.shape:
        raise ValueError(
            f"times and gammas must be non-empty and of one length, got {t.size} times and"
            f" {g.size} gammas"
        )
    if not np.all(np.isfinite(t) & (t > 0)):
        raise ValueError(f"times must be finite and > 0 (samples seen), got {times!r}")
    if not np.all(np.isfinite(g) & (g > 0)):
        raise ValueError(f"gammas must be finite and > 0, got {gammas!r}")
    return t, g


def solve(
    times: ArrayLike,
    gammas: ArrayLike,
    *,
    time: float,
    gamma: float,
    rcond: float | None = None,
) -> Solution:
    r"""EDM2's post-hoc weights: the snapshots' combination closest to a target profile.

    With :math:`A_{ij} = \langle p_i, p_j\rangle` over the snapshots' profiles and
    :math:`b_i = \langle p_i, p_\text{target}\rangle` (:func:`profile_inner`), the
    weights solve :math:`A x = b` (EDM2, Algorithm 3), normalised to sum to 1.

    ``A`` is a Gram matrix of nearly parallel functions: its condition number grows
    about as the fourth power of the number of snapshots (docs/posthoc.md has the
    numbers). The solve scales ``A`` to unit diagonal (each profile to unit norm,
    which removes the ``1/t`` spread of its entries) and factors it with
    ``numpy.linalg.lstsq`` (an SVD): singular values below ``rcond`` times the largest
    are dropped, giving the minimum-norm solution where the snapshots cannot be told
    apart instead of huge cancelling weights. All in float64.

    Args:
      times: each snapshot's time in samples seen (its average's last update).
      gammas: each snapshot's exponent.
      time: the target's time (the reconstruction's snapshot step, in samples).
      gamma: the target's exponent.
      rcond: lstsq's cutoff, relative to the largest singular value; None is NumPy's
        default, machine epsilon times the number of snapshots.

    Returns:
      A :class:`Solution`: the weights, the relative L2 error of the reconstructed
      profile, the scaled condition number and the rank used.

    Raises:
      ValueError: empty or mismatched inputs, a time or exponent that is not finite
        and positive, or weights that sum to 0 (no combination reaches the target).

    Example:
      >>> from ema_jax import posthoc, schedules
      >>> gamma = schedules.gamma_of_sigma_rel
      >>> s = posthoc.solve([100.0, 100.0], [gamma(0.05), gamma(0.10)],
      ...                   time=100.0, gamma=gamma(0.07))  # two snapshots, one target
      >>> s.weights.round(3).tolist(), round(s.residual, 3)
      ([0.438, 0.562], 0.056)
    """
    t, g = _check_profiles(times, gammas)
    (target_t,), (target_g,) = _check_profiles([time], [gamma])
    if rcond is not None and not (math.isfinite(rcond) and rcond >= 0):
        raise ValueError(f"rcond must be a finite number >= 0 or None, got {rcond!r}")
    a = profile_inner(t[:, None], g[:, None], t[None, :], g[None, :])
    b = profile_inner(t, g, target_t, target_g)
    norm = np.sqrt(np.diag(a))
    scaled, rank, singular = _lstsq(a / norm[:, None] / norm[None, :], b / norm, rcond)
    x = scaled / norm
    total = float(np.sum(x))
    if not math.isfinite(total) or abs(total) < 1e-12:
        raise ValueError(
            f"the least-squares weights sum to {total!r}: no combination of these snapshots"
            f" reaches the target profile (time={time!r}, gamma={gamma!r})"
        )
    x = x / total
    target = float(profile_inner(target_t, target_g, target_t, target_g))
    error = target - 2.0 * float(x @ b) + float(x @ a @ x)
    residual = math.sqrt(max(error, 0.0) / target)
    cond = float(singular[0] / singular[-1]) if singular[-1] > 0 else math.inf
    return Solution(weights=x, residual=residual, cond=cond, rank=int(rank))


def _lstsq(
    matrix: np.ndarray, rhs: np.ndarray, rcond: float | None
) -> tuple[np.ndarray, int, np.ndarray]:
    x, _, rank, singular = np.linalg.lstsq(matrix, rhs, rcond=rcond)
    return x, int(rank), singular


def gamma_of(sigma_rel: object, name: str = "sigma_rel") -> float:
    """The exponent of ``sigma_rel``, validated as :func:`schedules.power_function` does."""
    value = _validate.check_positive_real(name, sigma_rel)
    if value >= _edm.SIGMA_REL_OF_GAMMA_0:
        raise ValueError(
            f"{name} must be in (0, sqrt(1/12) = {_edm.SIGMA_REL_OF_GAMMA_0:.6f}) (gamma > 0),"
            f" got {sigma_rel!r}"
        )
    return _edm.gamma_of_sigma_rel(float(value))

"""Reconstruction: the EMA of any ``sigma_rel`` at any snapshot step, from the snapshots."""

from __future__ import annotations

import numbers
import os
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple
from typing import overload

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from ema_jax import _checkpoint as ckpt
from ema_jax import _validate
from ema_jax._trees import fit_problem
from ema_jax._trees import leaves_by_path
from ema_jax.posthoc import _math
from ema_jax.posthoc._format import SnapshotInfo
from ema_jax.posthoc._format import SnapshotMismatchError
from ema_jax.posthoc._format import SnapshotNotFoundError
from ema_jax.posthoc._format import describe_leaves
from ema_jax.posthoc._format import open_manager
from ema_jax.posthoc._format import read_snapshot

PyTree = Any


class Coefficients(NamedTuple):
    """How a reconstruction weighs the snapshots (see :func:`coefficients`)."""

    sigma_rel: float
    gamma: float
    step: int  # the snapshot step reconstructed
    time: float  # the target profile's time: samples seen at that step's last update
    sources: tuple[tuple[int, str], ...]  # (snapshot step, average name) of each weight
    times: np.ndarray  # shape=(N,), float64: each source's time in samples
    gammas: np.ndarray  # shape=(N,), float64: each source's exponent
    weights: np.ndarray  # shape=(N,), float64, summing to 1
    residual: float  # relative L2 error of the reconstructed profile (Solution.residual)
    cond: float  # condition number of the (scaled) least-squares matrix
    rank: int  # the rank lstsq used, of len(weights)


def _sigma_rels(sigma_rel: Any) -> tuple[list[float], bool]:
    """The targets as a list, and whether one was given (not a sequence)."""
    if isinstance(sigma_rel, numbers.Real):
        values, single = [sigma_rel], True
    elif isinstance(sigma_rel, Sequence) and not isinstance(sigma_rel, str) and sigma_rel:
        values, single = list(sigma_rel), False
    else:
        raise ValueError(f"sigma_rel must be a number or a non-empty sequence, got {sigma_rel!r}")
    for s in values:
        _math.gamma_of(s)
    return [float(s) for s in values], single


class _Found(NamedTuple):
    info: SnapshotInfo
    tree: Any  # orbax's tree metadata
    record: dict[str, Any]  # ema_jax's record: checksums and the posthoc entry


def _scan(manager: ocp.CheckpointManager, step: int | None) -> list[_Found]:
    """The snapshots up to ``step`` (default: the latest), checked to be of one model."""
    steps = sorted(manager.all_steps())
    if step is None:
        step = steps[-1]
    else:
        step = _validate.check_nonnegative_int("step", step)
        if step not in steps:
            raise SnapshotNotFoundError(
                f"no snapshot at step {step} in {manager.directory}; it has steps {steps}"
            )
    found = [_Found(*read_snapshot(manager, s)) for s in steps if s <= step]
    newest = found[-1].info
    for info, _, _ in found:
        if info.fingerprint != newest.fingerprint:
            raise SnapshotMismatchError(
                f"the snapshots in {manager.directory} are of different models: step"
                f" {info.step} has fingerprint {info.fingerprint}, step {newest.step}"
                f" {newest.fingerprint} (their variables differ in paths or shapes)"
            )
    return found


def _solve(infos: list[SnapshotInfo], sigma_rel: float) -> Coefficients:
    gamma = _math.gamma_of(sigma_rel)
    newest = infos[-1]
    time = max(a.time for a in newest.averages)
    sources = tuple((info.step, a.name) for info in infos for a in info.averages)
    times = np.array([a.time for info in infos for a in info.averages])
    gammas = np.array([a.gamma for info in infos for a in info.averages])
    solution = _math.solve(times, gammas, time=time, gamma=gamma)
    return Coefficients(
        sigma_rel=sigma_rel,
        gamma=gamma,
        step=newest.step,
        time=time,
        sources=sources,
        times=times,
        gammas=gammas,
        weights=solution.weights,
        residual=solution.residual,
        cond=solution.cond,
        rank=solution.rank,
    )


@overload
def coefficients(
    directory: str | os.PathLike[str], sigma_rel: float, *, step: int | None = None
) -> Coefficients: ...


@overload
def coefficients(
    directory: str | os.PathLike[str], sigma_rel: Sequence[float], *, step: int | None = None
) -> list[Coefficients]: ...


def coefficients(
    directory: str | os.PathLike[str],
    sigma_rel: float | Sequence[float],
    *,
    step: int | None = None,
) -> Coefficients | list[Coefficients]:
    """The weights that :func:`reconstruct` gives each snapshot, without reading arrays.

    Args:
      directory: the snapshot directory (of :class:`Snapshots`).
      sigma_rel: the target's relative width, in (0, sqrt(1/12)); or a sequence of them.
      step: the snapshot step to reconstruct; None: the latest.

    Returns:
      A :class:`Coefficients` (a list of them for a sequence): every snapshot up to
      ``step`` of every tracked average, its time and exponent, and its weight; the
      residual says how well the snapshots reach the target (0: exactly).

    Raises:
      ValueError: ``sigma_rel`` out of range.
      SnapshotNotFoundError: no snapshots in ``directory``, or none at ``step``.
      SnapshotMismatchError: snapshots of different models in ``directory``.

    Example:
      >>> import tempfile
      >>> import jax.numpy as jnp
      >>> from ema_jax import posthoc
      >>> ema = posthoc.trackers((0.05, 0.10), batch_size=8)
      >>> state = ema.init({"w": jnp.zeros(2)})
      >>> with tempfile.TemporaryDirectory() as workdir:
      ...     with posthoc.Snapshots(workdir, snapshot_every=10) as snapshots:
      ...         for step in range(1, 31):
      ...             state = ema.update({"w": jnp.full(2, float(step))}, state)
      ...             _ = snapshots.save(state, ema=ema, step=step)
      ...     c = posthoc.coefficients(workdir, 0.07)
      >>> c.step, c.time, c.sources[-1], round(float(c.weights.sum()), 12)
      (30, 240.0, (30, '0.1'), 1.0)
    """
    targets, single = _sigma_rels(sigma_rel)
    manager = open_manager(directory)
    try:
        infos = [found.info for found in _scan(manager, step)]
    finally:
        manager.close()
    result = [_solve(infos, s) for s in targets]
    return result[0] if single else result


def _load(manager: ocp.CheckpointManager, found: _Found) -> PyTree:
    """A snapshot's arrays as NumPy, checked against their CRC-32."""
    step = found.info.step
    where = f"snapshot step {step} in {manager.directory}"
    item = jax.tree.map(lambda m: np.empty(m.shape, m.dtype), dict(found.tree))
    return ckpt.read_verified(manager, step, item, found.record, where)


def reconstruct(
    directory: str | os.PathLike[str],
    sigma_rel: float | Sequence[float],
    *,
    step: int | None = None,
    like: PyTree = None,
) -> PyTree | list[PyTree]:
    r"""The power-function EMA of any ``sigma_rel`` at a snapshot step, after training.

    EDM2's post-hoc EMA (Karras et al. 2024, Sec. 3.2 and Algorithm 3): every snapshot
    up to ``step`` of every tracked average is a power-function profile of known time
    and exponent; the weights :math:`x` of :func:`coefficients` make
    :math:`\sum_i x_i p_i` the least-squares match of the target profile, and the
    reconstruction is :math:`\sum_i x_i \hat\theta_i` over the snapshots' averages,
    summed in float64 on the host (one snapshot in memory at a time) and returned in
    the EMA's dtype. Integer leaves are taken from the snapshot at ``step``.

    Args:
      directory: the snapshot directory (of :class:`Snapshots`).
      sigma_rel: the relative width wanted, in (0, sqrt(1/12)); or a sequence of them
        (one pass over the snapshots for all).
      step: the snapshot step to reconstruct at; None: the latest.
      like: optional variables of the model (concrete or abstract): the snapshots must
        fit them, and the result comes in their tree structure.

    Returns:
      The averaged variables (for an :class:`~ema_jax.EmaTrainState`,
      ``{"params": ..., "batch_stats": ...}``, ready for ``apply_fn``) as NumPy arrays;
      a list of them for a sequence of ``sigma_rel``.

    Raises:
      ValueError: ``sigma_rel`` out of range.
      SnapshotNotFoundError: no snapshots in ``directory``, or none at ``step``.
      SnapshotMismatchError: snapshots of different models, or not of ``like``'s.
      CorruptCheckpointError: a snapshot fails its checksums or cannot be read.

    Example:
      >>> import tempfile
      >>> import jax.numpy as jnp
      >>> from ema_jax import posthoc
      >>> ema = posthoc.trackers((0.05, 0.10), batch_size=8)
      >>> state = ema.init({"w": jnp.zeros(2)})
      >>> with tempfile.TemporaryDirectory() as workdir:
      ...     with posthoc.Snapshots(workdir, snapshot_every=10) as snapshots:
      ...         for step in range(1, 31):
      ...             state = ema.update({"w": jnp.full(2, 1.0)}, state)
      ...             _ = snapshots.save(state, ema=ema, step=step)
      ...     narrow, wide = posthoc.reconstruct(workdir, [0.02, 0.2], step=20)
      >>> narrow["w"].round(4), wide["w"].dtype  # the average of constant weights
      (array([1., 1.], dtype=float32), dtype('float32'))
    """
    targets, single = _sigma_rels(sigma_rel)
    manager = open_manager(directory)
    try:
        snapshots = _scan(manager, step)
        infos = [found.info for found in snapshots]
        newest = infos[-1]
        if like is not None:
            fingerprint, leaves = describe_leaves(
                jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x)), like)
            )
            if fingerprint != newest.fingerprint:
                problem = fit_problem(
                    dict(newest.leaves), leaves, got_name="the snapshots", want_name="like"
                )
                raise SnapshotMismatchError(
                    f"the snapshots in {manager.directory} are of another model"
                    + ("" if problem is None else f": {problem}")
                )
        solutions = [_solve(infos, s) for s in targets]
        index = {source: i for i, source in enumerate(solutions[0].sources)}
        sums: list[dict[str, np.ndarray]] = [{} for _ in solutions]
        template = None
        for found in snapshots:
            info = found.info
            restored = _load(manager, found)["averages"]
            for average in info.averages:
                i = index[(info.step, average.name)]
                variables = restored[average.name]
                if info is newest and template is None:
                    template = variables
                for path, x in leaves_by_path(variables).items():
                    if not jnp.issubdtype(jnp.dtype(newest.leaves[path]["dtype"]), jnp.floating):
                        continue
                    x64 = np.asarray(x, np.float64)
                    for total, solution in zip(sums, solutions, strict=True):
                        term = solution.weights[i] * x64
                        total[path] = total[path] + term if path in total else term
    finally:
        manager.close()
    results = [_assemble(template, total, newest, like) for total in sums]
    return results[0] if single else results


def _assemble(
    template: PyTree, total: dict[str, np.ndarray], info: SnapshotInfo, like: PyTree
) -> PyTree:
    """The sums in the EMA's dtypes, in the template's (or ``like``'s) tree structure."""
    flat = leaves_by_path(template)
    out = {
        path: total[path].astype(jnp.dtype(info.leaves[path]["dtype"])) if path in total else x
        for path, x in flat.items()
    }
    structure = template if like is None else like
    leaves = [out[path] for path in leaves_by_path(structure)]
    return jax.tree.unflatten(jax.tree.structure(structure), leaves)

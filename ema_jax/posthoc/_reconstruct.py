"""Reconstruction: the EMA of any ``sigma_rel`` at any snapshot step, from the snapshots."""

from __future__ import annotations

import numbers
import os
from collections.abc import Iterator
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple
from typing import overload

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from ema_jax import _validate
from ema_jax._trees import fit_problem
from ema_jax._trees import leaves_by_path
from ema_jax.posthoc import _checks
from ema_jax.posthoc import _leafwise
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
    _checks.check_one_run(
        manager.directory, [f.info.step for f in found], [f.record for f in found]
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


def reconstruct(
    directory: str | os.PathLike[str],
    sigma_rel: float | Sequence[float],
    *,
    step: int | None = None,
    like: PyTree = None,
    allow_extrapolation: bool = False,
) -> PyTree | list[PyTree]:
    r"""The power-function EMA of any ``sigma_rel`` at a snapshot step, after training.

    EDM2's post-hoc EMA (Karras et al. 2024, Sec. 3.2 and Algorithm 3): every snapshot
    up to ``step`` of every tracked average is a power-function profile of known time
    and exponent; the weights :math:`x` of :func:`coefficients` make
    :math:`\sum_i x_i p_i` the least-squares match of the target profile, and the
    reconstruction is :math:`\sum_i x_i \hat\theta_i` over the snapshots' averages,
    summed in float64 on the host and returned in the EMA's dtype. The snapshots are
    read a group of leaves at a time and the float64 sums held at once stay within a
    fixed budget whatever the number of widths (docs/posthoc.md, "Memory"). Integer
    leaves are taken from the snapshot at ``step``.

    A target the snapshots do not reach (``Coefficients.residual`` above 0.02: a width
    outside the tracked ones, or too few snapshots) warns with an
    :class:`ExtrapolationWarning`; above 0.1 it raises :class:`ExtrapolationError`
    unless ``allow_extrapolation``. Both name the residual and trackers that reach it.

    Args:
      directory: the snapshot directory (of :class:`Snapshots`).
      sigma_rel: the relative width wanted, in (0, sqrt(1/12)); or a sequence of them.
      step: the snapshot step to reconstruct at; None: the latest.
      like: optional variables of the model (concrete or abstract): the snapshots must
        fit them, and the result comes in their tree structure; each leaf goes onto
        ``like``'s sharding where it has one (a ``jax.ShapeDtypeStruct`` with a
        sharding, or a ``jax.Array``), leaf by leaf as it is finished.
      allow_extrapolation: return targets above the error threshold (with a warning).

    Returns:
      The averaged variables (for an :class:`~ema_jax.EmaTrainState`,
      ``{"params": ..., "batch_stats": ...}``, ready for ``apply_fn``) as NumPy arrays
      (jax Arrays where ``like`` has shardings); a list of them for a sequence.

    Raises:
      ValueError: ``sigma_rel`` out of range, or a sharding of ``like`` that does not
        fit its leaf's shape (naming the leaf).
      ExtrapolationError: a target the snapshots do not reach (see above).
      SnapshotNotFoundError: no snapshots in ``directory``, or none at ``step``.
      SnapshotMismatchError: snapshots of different models or of runs with other
        settings (batch size, exponents), or not of ``like``'s model.
      CorruptCheckpointError: a snapshot fails its checksums or cannot be read.

    Example:
      >>> import tempfile
      >>> import jax.numpy as jnp
      >>> from ema_jax import posthoc
      >>> ema = posthoc.trackers((0.05, 0.10), batch_size=8)
      >>> state = ema.init({"w": jnp.zeros(2)})
      >>> with tempfile.TemporaryDirectory() as workdir:
      ...     with posthoc.Snapshots(workdir, snapshot_every=2) as snapshots:
      ...         for step in range(1, 31):
      ...             state = ema.update({"w": jnp.full(2, 1.0)}, state)
      ...             _ = snapshots.save(state, ema=ema, step=step)
      ...     narrow, wide = posthoc.reconstruct(workdir, [0.06, 0.09], step=20)
      >>> narrow["w"].round(4), wide["w"].dtype  # the average of constant weights
      (array([1., 1.], dtype=float32), dtype('float32'))
    """
    targets, single = _sigma_rels(sigma_rel)
    allow = _validate.check_bool("allow_extrapolation", allow_extrapolation)
    results: list[PyTree] = [None] * len(targets)
    # The warnings point at the caller: reconstruct, the generator, check_residual.
    found = iter_reconstruct(directory, targets, step=step, like=like, allow=allow, stacklevel=4)
    for k, tree in found:
        results[k] = tree
    return results[0] if single else results


def iter_reconstruct(
    directory: str | os.PathLike[str],
    targets: list[float],
    *,
    step: int | None,
    like: PyTree,
    allow: bool,
    result_bytes: bool = False,
    stacklevel: int = 3,
) -> Iterator[tuple[int, PyTree]]:
    """``(index into targets, variables)`` as each batch of widths is finished.

    ``result_bytes``: count the finished results against the memory budget (the caller
    hands each over before taking the next, as the CLI writes them).
    """
    manager = open_manager(directory)
    reader = _leafwise.Reader(manager)
    try:
        snapshots = _scan(manager, step)
        infos = [found.info for found in snapshots]
        newest = infos[-1]
        places = _places(directory, newest, like)
        solutions = [_solve(infos, s) for s in targets]
        tracked = [a.sigma_rel for a in newest.averages]
        times = _checks.snapshot_times(infos)
        for solution in solutions:
            _checks.check_residual(
                solution, tracked, times, allow_extrapolation=allow, stacklevel=stacklevel
            )
        width_bytes = sum(
            _leafwise.elements(e) * np.dtype(jnp.dtype(e["dtype"])).itemsize
            for e in newest.leaves.values()
        )
        groups, batch = _leafwise.plan(
            newest.leaves, len(targets), result_bytes=width_bytes if result_bytes else 0
        )
        for first in range(0, len(targets), batch):
            chosen = list(range(first, min(first + batch, len(targets))))
            trees = _pass(reader, snapshots, [solutions[k] for k in chosen], groups, places)
            for k, values in zip(chosen, trees, strict=True):
                yield k, _assemble(snapshots[-1], values, like)
    finally:
        reader.close()
        manager.close()


def _places(directory: Any, newest: SnapshotInfo, like: PyTree) -> dict[str, Any]:
    """``like``'s shardings by leaf path, checked to fit the snapshots' shapes."""
    if like is None:
        return {}
    fingerprint, leaves = describe_leaves(
        jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x)), like)
    )
    if fingerprint != newest.fingerprint:
        problem = fit_problem(
            dict(newest.leaves), leaves, got_name="the snapshots", want_name="like"
        )
        raise SnapshotMismatchError(
            f"the snapshots in {directory} are of another model"
            + ("" if problem is None else f": {problem}")
        )
    places = {}
    for path, ref in leaves_by_path(like).items():
        sharding = getattr(ref, "sharding", None)
        if sharding is None:
            continue
        shape = tuple(newest.leaves[path]["shape"])
        try:
            sharding.check_compatible_aval(shape)  # the rank
            sharding.shard_shape(shape)  # divisibility
        except Exception as err:  # jax says why in its own words
            raise ValueError(
                f"like's sharding of {path} does not fit its shape {shape}: {err}"
            ) from None
        places[path] = sharding
    return places


def _pass(
    reader: _leafwise.Reader,
    snapshots: list[_Found],
    solutions: list[Coefficients],
    groups: list[list[str]],
    places: dict[str, Any],
) -> list[dict[str, Any]]:
    """One pass over the snapshots, a group of leaves at a time: each width's leaves."""
    newest = snapshots[-1].info
    keep = newest.averages[0].name  # integer leaves come from this average at ``step``
    index = {source: i for i, source in enumerate(solutions[0].sources)}
    out: list[dict[str, Any]] = [{} for _ in solutions]
    floating = {
        path: bool(jnp.issubdtype(jnp.dtype(entry["dtype"]), jnp.floating))
        for path, entry in newest.leaves.items()
    }
    for group in groups:
        sums: list[dict[str, np.ndarray]] = [{} for _ in solutions]
        scratch: dict[str, np.ndarray] = {}  # one float64 product per leaf, reused
        fixed: dict[str, np.ndarray] = {}
        for found in snapshots:
            info = found.info
            last = info is newest
            paths = [p for p in group if floating[p] or last]
            wanted = [f"averages.{a.name}.{p}" for a in info.averages for p in paths]
            if not wanted:
                continue
            arrays = reader.read(info.step, found.tree, found.record, wanted)
            for average in info.averages:
                i = index[(info.step, average.name)]
                for p in paths:
                    x = arrays.pop(f"averages.{average.name}.{p}")
                    if not floating[p]:
                        if average.name == keep:
                            fixed[p] = x
                        continue
                    for total, solution in zip(sums, solutions, strict=True):
                        weight = solution.weights[i]  # the product in float64, no copy of x
                        if p in total:
                            if p not in scratch:
                                scratch[p] = np.empty(x.shape, np.float64)
                            np.multiply(x, weight, out=scratch[p], dtype=np.float64)
                            total[p] += scratch[p]
                        else:
                            total[p] = np.multiply(x, weight, dtype=np.float64)
                    del x
        scratch.clear()
        for total, result in zip(sums, out, strict=True):
            for p in group:
                dtype = jnp.dtype(newest.leaves[p]["dtype"])
                value = total.pop(p).astype(dtype) if floating[p] else fixed[p]
                result[p] = jax.device_put(value, places[p]) if p in places else value
    return out


def _assemble(found: _Found, values: dict[str, Any], like: PyTree) -> PyTree:
    """The finished leaves in the snapshots' (or ``like``'s) tree structure."""
    info = found.info
    template = found.tree["averages"][info.averages[0].name]
    structure = template if like is None else like
    leaves = [values[path] for path in leaves_by_path(structure)]
    return jax.tree.unflatten(jax.tree.structure(structure), leaves)

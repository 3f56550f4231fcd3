"""Saving snapshots of power-function EMAs: the trackers and :class:`Snapshots`."""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from ema_jax import _checkpoint as ckpt
from ema_jax import _validate
from ema_jax._checkpoint import RECORD_KEY
from ema_jax._checkpoint import make_record
from ema_jax._transform import Ema
from ema_jax._transform import EmaState
from ema_jax._transform import ema as make_ema
from ema_jax.linen import EmaTrainState
from ema_jax.posthoc import _checks
from ema_jax.posthoc import _math
from ema_jax.posthoc._format import FORMAT
from ema_jax.posthoc._format import POSTHOC_KEY
from ema_jax.posthoc._format import SnapshotMismatchError
from ema_jax.posthoc._format import describe_leaves
from ema_jax.posthoc._format import last_update_time
from ema_jax.posthoc._format import read_info
from ema_jax.posthoc._format import read_snapshot
from ema_jax.schedules import PowerFunction
from ema_jax.schedules import power_function

PyTree = Any


def trackers(
    sigma_rels: Sequence[float] = (0.05, 0.10),
    *,
    batch_size: float,
    update_period: int = 1,
    ema_dtype: Any = None,
    nonfinite: str = "skip",
    rounding: str = "nearest",
    memory_kind: str | None = None,
) -> Ema:
    """Power-function EMAs at several ``sigma_rel`` in one pass: what :class:`Snapshots` saves.

    ``ema_jax.ema({f"{s:g}": schedules.power_function(sigma_rel=s, batch_size=...,
    update_period=...) for s in sigma_rels})``: put it in an
    :class:`~ema_jax.EmaTrainState` as its ``ema`` so that the trackers are
    checkpointed and resumed with the rest.

    Args:
      sigma_rels: the tracked relative widths, two or more (EDM2: 0.05 and 0.10).
      batch_size: the global batch of one optimizer step.
      update_period: update the averages every this many optimizer steps.
      ema_dtype, nonfinite, rounding, memory_kind: as in :func:`ema_jax.ema`
        (``memory_kind="pinned_host"``: the trackers live in host memory).

    Example:
      >>> from ema_jax import posthoc
      >>> ema = posthoc.trackers(batch_size=256)
      >>> ema.names, [round(s.exponent, 2) for s in ema.schedules]
      (('0.05', '0.1'), [16.97, 6.94])
    """
    if isinstance(sigma_rels, str) or not isinstance(sigma_rels, Sequence) or len(sigma_rels) < 2:
        raise ValueError(f"sigma_rels must be a sequence of two or more, got {sigma_rels!r}")
    for s in sigma_rels:
        _math.gamma_of(s, "sigma_rels[i]")
    names = [f"{s:g}" for s in sigma_rels]
    if len(set(names)) != len(names):
        raise ValueError(f"sigma_rels must be distinct, got {sigma_rels!r}")
    schedules = {
        name: power_function(sigma_rel=s, batch_size=batch_size, update_period=update_period)
        for name, s in zip(names, sigma_rels, strict=True)
    }
    return make_ema(
        schedules,  # type: ignore[arg-type]
        ema_dtype=ema_dtype,
        nonfinite=nonfinite,  # type: ignore[arg-type]
        rounding=rounding,  # type: ignore[arg-type]
        memory_kind=memory_kind,
    )


class Snapshots:
    """Saves snapshots of power-function EMAs every ``snapshot_every`` optimizer steps.

    Call :meth:`save` after every train step (before ``save_checkpoint`` at the same
    step); it writes a snapshot when the EMA's step (``ema_state.step``, optimizer
    steps) is a multiple of ``snapshot_every``. Each snapshot is one step of an orbax
    ``CheckpointManager`` under ``directory``. Afterwards :func:`reconstruct` gives the
    EMA of any ``sigma_rel`` at any snapshot step.

    Resuming: after restoring the train state at step ``s``, call
    ``discard_after(s)``: snapshots after ``s`` belong to the run that was rolled back.
    A snapshot already in the directory at the step being saved is kept.

    Args:
      directory: where the snapshots go (created if missing).
      snapshot_every: save at EMA steps that are multiples of this (docs/posthoc.md
        helps choose it).
      dtype: store the averages' floating leaves in this dtype (``"bfloat16"`` or
        ``"float16"`` halve the disk of float32); None keeps the EMA's dtype.
      which: the averages to save (names or indices), all of them by default; each
        must be a :func:`schedules.power_function`.

    Example:
      >>> import tempfile
      >>> import jax, jax.numpy as jnp
      >>> from ema_jax import posthoc
      >>> ema = posthoc.trackers(batch_size=4)
      >>> state = ema.init({"w": jnp.zeros(3)})
      >>> with tempfile.TemporaryDirectory() as workdir:
      ...     with posthoc.Snapshots(workdir, snapshot_every=2) as snapshots:
      ...         for i in range(24):
      ...             state = ema.update({"w": jnp.full(3, float(i))}, state)
      ...             _ = snapshots.save(state, ema=ema)
      ...         snapshots.wait_until_finished()
      ...         print(snapshots.steps()[:3], len(snapshots.steps()))
      ...     variables = posthoc.reconstruct(workdir, 0.07)
      [2, 4, 6] 12
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        snapshot_every: int,
        dtype: Any = None,
        which: Sequence[int | str] | None = None,
    ) -> None:
        self.directory = ckpt.absolute(directory)  # orbax refuses relative paths
        self.snapshot_every = _validate.check_positive_int("snapshot_every", snapshot_every)
        self.dtype = None if dtype is None else _validate.resolve_dtype(dtype, "dtype")
        if which is not None and (isinstance(which, str) or not isinstance(which, Sequence)):
            raise ValueError(f"which must be a sequence of names or indices, got {which!r}")
        self.which = None if which is None else tuple(which)
        self._manager = ocp.CheckpointManager(
            self.directory,
            item_handlers=ocp.StandardCheckpointHandler(),
            options=ocp.CheckpointManagerOptions(create=True),
        )
        self._saved: int | None = None  # the step this object saved last
        self._fingerprint: str | None = None  # the directory's, once read
        self._settings: tuple[int, dict[str, Any]] | None = None  # (step, its settings)

    def save(
        self,
        state: EmaTrainState | EmaState,
        *,
        ema: Ema | None = None,
        step: int | None = None,
        force: bool = False,
    ) -> bool:
        """Saves a snapshot if the EMA's step is a multiple of ``snapshot_every``.

        Args:
          state: an :class:`~ema_jax.EmaTrainState`, or an :class:`~ema_jax.EmaState`
            with its transform in ``ema``.
          ema: the transform, when ``state`` is an ``EmaState``.
          step: ``int(state.ema_state.step)`` when you know it on the host: without it,
            every call reads the step from the device (a sync that stalls asynchronous
            dispatch). Checked against the state when a snapshot is due.
          force: save at this step whatever ``snapshot_every`` says (the last step).

        Returns:
          Whether a snapshot was written (asynchronously: :meth:`wait_until_finished`).

        Raises:
          ValueError: an average that is not a power function, a ``step`` that is not
            the state's, snapshots in the directory after this step (call
            :meth:`discard_after` on resume), or values beyond ``dtype``'s range.
          SnapshotMismatchError: the directory holds snapshots of another model.
        """
        ema, ema_state = _unpack(state, ema)
        picked = self._picked(ema)
        if step is None:
            step = int(ema_state.step)
        else:
            step = _validate.check_nonnegative_int("step", step)
        if step == 0 or not (force or step % self.snapshot_every == 0) or step == self._saved:
            return False
        actual = int(ema_state.step)
        if actual != step:
            raise ValueError(
                f"step={step} but the state's EMA has made {actual} steps: pass"
                " int(state.ema_state.step), the optimizer steps (not state.step under"
                " optax.MultiSteps)"
            )
        indices = tuple(k for _, k, _ in picked)
        dtype = None if self.dtype is None else self.dtype.name
        extracted, beyond = _extract(ema_state.ema, ema=ema, indices=indices, dtype=dtype)
        averages = dict(zip((name for name, _, _ in picked), extracted, strict=True))
        which = indices[0] if ema.several else None
        fingerprint, leaves = describe_leaves(  # in the EMA's own dtypes
            jax.eval_shape(lambda tree: ema.average(tree, which), ema_state.ema)
        )
        self._check_fingerprint(fingerprint)
        self._check_range(averages, jax.device_get(beyond))
        item = {"averages": averages}
        entry = {
            "format": FORMAT,
            "step": step,
            "averages": [
                {
                    "name": name,
                    "gamma": float(schedule.exponent),
                    "sigma_rel": float(schedule.relative_width),
                    "time": last_update_time(schedule, step),
                    "batch_size": float(schedule.batch_size),
                    "update_period": int(schedule.update_period),
                }
                for name, _, schedule in picked
            ],
            "dtype": None if self.dtype is None else self.dtype.name,
            "fingerprint": fingerprint,
            "leaves": leaves,
        }
        self._check_settings(entry)
        later = [s for s in self.steps() if s >= step]
        if later == [step]:  # saved before: by the run this one resumes, or a stale one
            self._check_same(step, item)
            return False
        if later:
            raise ValueError(
                f"{self.directory} has snapshots at or after step {step} ({later}): they"
                " belong to a run that was rolled back; after restoring the state, call"
                " snapshots.discard_after(<the restored step>)"
            )
        record = make_record(item, None)
        record[POSTHOC_KEY] = entry
        self._manager.save(
            step, args=ocp.args.StandardSave(item, custom_metadata={RECORD_KEY: record})
        )
        self._saved = step
        return True

    def _picked(self, ema: Ema) -> list[tuple[str, int, PowerFunction]]:
        """``(name, index, schedule)`` of the averages to save: power functions only."""
        count = len(ema.schedules)
        if self.which is None:
            indices = list(range(count))
        else:
            indices = [ema.index(w) if ema.several else _single(w) for w in self.which]
        if not indices or len(set(indices)) != len(indices):
            raise ValueError(f"which must name distinct averages, got {self.which!r}")
        picked = []
        for k in indices:
            schedule = ema.schedules[k]
            name = ema.names[k] if ema.names is not None else str(k)
            if not isinstance(schedule, PowerFunction):
                raise ValueError(
                    f"average {name!r} has a {schedule.name} schedule: post-hoc snapshots"
                    " need schedules.power_function averages (pick them with which=)"
                )
            picked.append((name, k, schedule))
        return picked

    def _check_range(self, averages: dict[str, PyTree], beyond: tuple[PyTree, ...]) -> None:
        """Refuses averages with values beyond the storage dtype's range."""
        if self.dtype is None:
            return
        for (name, variables), flags in zip(averages.items(), beyond, strict=True):
            paths = jax.tree_util.tree_flatten_with_path(variables)[0]
            for (path, _), flag in zip(paths, jax.tree.leaves(flags), strict=True):
                if flag:
                    top = float(jnp.finfo(self.dtype).max)
                    raise ValueError(
                        f"average {name!r} has values at {jax.tree_util.keystr(path)} beyond"
                        f" {self.dtype.name}'s range ({top:g}): store with dtype='bfloat16'"
                        " or None"
                    )

    def _check_fingerprint(self, fingerprint: str) -> None:
        if self._fingerprint is None:
            steps = self.steps()
            if not steps:
                self._fingerprint = fingerprint
                return
            self._fingerprint = read_info(self._manager, steps[-1]).fingerprint
        if fingerprint != self._fingerprint:
            raise SnapshotMismatchError(
                f"{self.directory} holds snapshots of another model (fingerprint"
                f" {self._fingerprint}, this one's {fingerprint}): pass another directory"
            )

    def _check_settings(self, entry: dict[str, Any]) -> None:
        """Refuses averages of other settings (batch size, exponents) than the directory's."""
        if self._settings is None:
            steps = self.steps()
            if not steps:
                self._settings = (0, _checks.settings({POSTHOC_KEY: entry}))
                return
            record = read_snapshot(self._manager, steps[-1])[2]
            self._settings = (steps[-1], _checks.settings(record))
        newest, settings = self._settings
        why = _checks.settings_difference(settings, _checks.settings({POSTHOC_KEY: entry}))
        if why is not None:
            raise SnapshotMismatchError(
                f"{self.directory} holds snapshots of a run with other settings (step"
                f" {newest}'s vs this state's: {why}): pass another directory"
            )

    def _check_same(self, step: int, item: dict[str, Any]) -> None:
        """Refuses to keep a snapshot at ``step`` that holds other averages than ``item``."""
        saved = read_snapshot(self._manager, step)[2]["arrays"]
        if make_record(item, None)["arrays"] != saved:
            raise ValueError(
                f"{self.directory} already has a snapshot at step {step} whose averages"
                " differ from this state's at that step: it was saved by a run that was"
                " rolled back (stale); after restoring the state, call"
                " snapshots.discard_after(<the restored step>), which deletes it"
            )

    def steps(self) -> list[int]:
        """The steps of the finalized snapshots, ascending."""
        return sorted(self._manager.all_steps())

    def discard_after(self, step: int) -> list[int]:
        """Deletes the snapshots after ``step`` (call it on resume); returns their steps."""
        step = _validate.check_nonnegative_int("step", step)
        self._manager.wait_until_finished()
        later = [s for s in self.steps() if s > step]
        for s in later:
            self._manager.delete(s)
        if self._saved is not None and self._saved > step:
            self._saved = None
        self._settings = None
        return later

    def wait_until_finished(self) -> None:
        """Blocks until the asynchronous saves are written."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Finishes pending saves and releases the manager."""
        self._manager.close()

    def __enter__(self) -> Snapshots:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@functools.partial(jax.jit, static_argnames=("ema", "indices", "dtype"))
def _extract(
    tree: PyTree, *, ema: Ema, indices: tuple[int, ...], dtype: str | None
) -> tuple[tuple[PyTree, ...], tuple[PyTree, ...]]:
    """The averages ``indices`` of ``EmaState.ema``, floating leaves cast to ``dtype``, and
    for each leaf whether it holds finite values beyond ``dtype``'s range. One program."""

    def floating(x: jax.Array) -> bool:
        return dtype is not None and jnp.issubdtype(x.dtype, jnp.floating)

    def cast(x: jax.Array) -> jax.Array:
        return x.astype(dtype) if floating(x) else x

    def beyond(x: jax.Array) -> jax.Array:
        if not floating(x):
            return jnp.zeros((), bool)
        top = jnp.finfo(dtype).max
        return jnp.any(jnp.isfinite(x) & (jnp.abs(x.astype(jnp.float32)) > top))

    averages = [ema.average(tree, k if ema.several else None) for k in indices]
    return (
        tuple(jax.tree.map(cast, a) for a in averages),
        tuple(jax.tree.map(beyond, a) for a in averages),
    )


def _single(which: int | str) -> int:
    if which not in (0, "0"):
        raise ValueError(f"this EMA keeps one average: which must be (0,), got {which!r}")
    return 0


def _unpack(state: Any, ema: Ema | None) -> tuple[Ema, EmaState]:
    if isinstance(state, EmaTrainState):
        if ema is not None and ema is not state.ema:
            raise ValueError("ema must be None for an EmaTrainState: its own ema is used")
        return state.ema, state.ema_state
    if isinstance(state, EmaState):
        if not isinstance(ema, Ema):
            raise TypeError(f"an EmaState needs its transform in ema=, got ema={ema!r}")
        return ema, state
    raise TypeError(
        f"state must be an ema_jax.EmaTrainState or an EmaState, got {type(state).__name__}"
    )

"""What a post-hoc snapshot is on disk, and reading it back without its arrays.

A snapshot is the K tracked averages at one optimizer step, one orbax checkpoint (a
plain ``ocp.CheckpointManager`` step) holding ``{"averages": {name: variables}}``, with
ema_jax's record in its custom metadata: a CRC-32 of every array and, under
``"posthoc"``, each average's exponent and time, the storage dtype, the leaves' shapes
and dtypes and a fingerprint of the variables' structure.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any
from typing import NamedTuple

import numpy as np
import orbax.checkpoint as ocp

from ema_jax import _checkpoint as ckpt
from ema_jax._checkpoint import RECORD_KEY
from ema_jax._checkpoint import corrupt
from ema_jax._trees import leaves_by_path
from ema_jax.schedules import PowerFunction

PyTree = Any

POSTHOC_KEY = "posthoc"  # the snapshot's entry in ema_jax's record
FORMAT = 1


class SnapshotNotFoundError(FileNotFoundError):
    """No post-hoc snapshot where one is needed: an empty directory, or a missing step."""

    __module__ = "ema_jax.posthoc"


class SnapshotMismatchError(ValueError):
    """Snapshots of another model: their variables differ in structure or shapes."""

    __module__ = "ema_jax.posthoc"


class Average(NamedTuple):
    """One tracked average in a snapshot."""

    name: str
    gamma: float
    sigma_rel: float
    time: float  # samples seen at the average's last update


class SnapshotInfo(NamedTuple):
    """What a snapshot holds, from its metadata (no arrays read)."""

    step: int  # optimizer steps (EmaState.step) at the snapshot
    averages: tuple[Average, ...]
    dtype: str | None  # the storage dtype; None: each leaf in the EMA's own
    fingerprint: str  # of the variables' paths and shapes
    leaves: Mapping[str, Mapping[str, Any]]  # path -> {"shape", "dtype"} (the EMA's dtype)


def last_update_time(schedule: PowerFunction, step: int) -> float:
    """Samples seen at the last update of a power-function EMA that has made ``step`` calls.

    Call ``i`` (0-based) folds in the parameters after ``i + 1`` optimizer steps and
    updates when ``i % update_period == 0``, so the last update is call
    ``((step - 1) // update_period) * update_period``.
    """
    k = schedule.update_period
    return float(((step - 1) // k * k + 1) * schedule.batch_size)


def describe_leaves(variables: PyTree) -> tuple[str, dict[str, dict[str, Any]]]:
    """The fingerprint of a variables tree (its paths and shapes) and its leaves' shapes/dtypes."""
    leaves = {
        path: {"shape": [int(n) for n in np.shape(x)], "dtype": np.dtype(x.dtype).name}
        for path, x in leaves_by_path(variables).items()
    }
    shapes = [[path, entry["shape"]] for path, entry in leaves.items()]
    digest = hashlib.sha256(json.dumps(shapes).encode()).hexdigest()[:16]
    return digest, leaves


def open_manager(directory: str | os.PathLike[str]) -> ocp.CheckpointManager:
    """A read-only manager of a snapshot directory; SnapshotNotFoundError if it has none."""
    path = ckpt.absolute(directory)  # orbax refuses relative paths
    if not os.path.isdir(path):
        raise SnapshotNotFoundError(f"no post-hoc snapshots: {path} is not a directory")
    manager = ocp.CheckpointManager(path, item_handlers=ocp.StandardCheckpointHandler())
    if not manager.all_steps():
        manager.close()
        raise SnapshotNotFoundError(f"no post-hoc snapshots in {path}: it has no finalized steps")
    return manager


def read_snapshot(
    manager: ocp.CheckpointManager, step: int
) -> tuple[SnapshotInfo, Mapping[str, Any], dict[str, Any]]:
    """A snapshot's :class:`SnapshotInfo`, its tree metadata and ema_jax's record.

    Raises:
      CorruptCheckpointError: the metadata cannot be read.
      SnapshotNotFoundError: the step is a checkpoint but not a post-hoc snapshot.
    """
    where = f"snapshot step {step} in {manager.directory}"
    tree, record = ckpt.read_metadata(manager, step, where)
    entry = None if record is None else record.get(POSTHOC_KEY)
    if record is None or not isinstance(entry, Mapping):
        raise SnapshotNotFoundError(
            f"{where} is not a post-hoc snapshot (no {RECORD_KEY}.{POSTHOC_KEY} record):"
            " pass the directory that posthoc.Snapshots writes"
        )
    if not isinstance(tree, Mapping) or not isinstance(tree.get("averages"), Mapping):
        raise corrupt(where, step, manager.directory, "its tree metadata cannot be read")
    try:
        averages = tuple(
            Average(a["name"], float(a["gamma"]), float(a["sigma_rel"]), float(a["time"]))
            for a in entry["averages"]
        )
        info = SnapshotInfo(
            step=int(entry["step"]),
            averages=averages,
            dtype=entry["dtype"],
            fingerprint=str(entry["fingerprint"]),
            leaves=dict(entry["leaves"]),
        )
    except (KeyError, TypeError, ValueError):
        raise corrupt(where, step, manager.directory, "its posthoc record is malformed") from None
    return info, tree, record


def read_info(manager: ocp.CheckpointManager, step: int) -> SnapshotInfo:
    """A snapshot's :class:`SnapshotInfo`, from its metadata."""
    return read_snapshot(manager, step)[0]


def list_snapshots(directory: str | os.PathLike[str]) -> list[SnapshotInfo]:
    """Every snapshot in ``directory``, by step.

    Raises:
      SnapshotNotFoundError: no snapshots, or checkpoints that are not snapshots.

    Example:
      >>> import tempfile
      >>> from ema_jax import posthoc
      >>> with tempfile.TemporaryDirectory() as workdir:
      ...     posthoc.list_snapshots(workdir)
      Traceback (most recent call last):
      ...
      ema_jax.posthoc.SnapshotNotFoundError: no post-hoc snapshots in ...
    """
    manager = open_manager(directory)
    try:
        return [read_info(manager, step) for step in sorted(manager.all_steps())]
    finally:
        manager.close()


def disk_bytes(manager: ocp.CheckpointManager, step: int) -> int:
    """Bytes on disk of one snapshot (its step directory)."""
    root = ckpt.item_directory(manager, step).parent
    return sum(
        os.path.getsize(os.path.join(folder, name))
        for folder, _, names in os.walk(root)
        for name in names
    )

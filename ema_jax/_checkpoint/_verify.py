"""Verification of restored arrays against the record, and the casts around a read."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from ema_jax._checkpoint._errors import corrupt
from ema_jax._checkpoint._record import describe
from ema_jax._checkpoint._record import host_arrays
from ema_jax._trees import leaf_path
from ema_jax._trees import leaves_by_path

PyTree = Any


def saved_dtypes(target: PyTree, arrays: Mapping[str, Any]) -> PyTree:
    """``target`` with each leaf that was saved in another dtype replaced by a
    ``ShapeDtypeStruct`` of the saved dtype (on the target leaf's sharding), so that the
    bytes read are the bytes checksummed."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(target)
    leaves = []
    for path, leaf in flat:
        saved = arrays.get(leaf_path(path))
        dtype = jnp.dtype(saved["dtype"]) if saved is not None else None
        if dtype is None or dtype == jnp.dtype(leaf.dtype):
            leaves.append(leaf)
        else:
            sharding = getattr(leaf, "sharding", None)
            leaves.append(jax.ShapeDtypeStruct(leaf.shape, dtype, sharding=sharding))
    return jax.tree.unflatten(treedef, leaves)


def verify(
    record: Mapping[str, Any], restored: PyTree, where: str, step: int, directory: Any
) -> None:
    """Raises CorruptCheckpointError at the first restored array unlike the one saved.

    Every array this process holds whole must have its checksum in ``record``, unless
    the record lists it as unchecked (spread over processes at save time): a checksum
    removed from the record is damage, not a reason to skip the check.
    """
    arrays = record["arrays"]
    listed = set(record.get("unchecked", ()))
    got = leaves_by_path(restored)
    for path, data in host_arrays(restored):
        saved = arrays.get(path)
        if saved is None:
            if path in listed:
                continue
            problem = f"{path} has no checksum in its {'ema_jax'!r} record"
            raise corrupt(where, step, directory, problem, path)
        have = describe(data)
        for field in ("dtype", "shape", "crc32"):
            if have[field] != saved[field]:
                raise corrupt(
                    where,
                    step,
                    directory,
                    f"{path} reads back with {field} {have[field]}, but was saved with"
                    f" {saved[field]} (checksum mismatch: its bytes on storage are damaged)"
                    if field == "crc32"
                    else f"{path} reads back with {field} {have[field]}, but was saved with"
                    f" {saved[field]}",
                    path,
                )
    missing = [path for path in arrays if path not in got]
    if missing:
        problem = f"{missing[0]} has a checksum but is not in the checkpoint's tree"
        raise corrupt(where, step, directory, problem, missing[0])


def cast_like(restored: PyTree, target: PyTree) -> PyTree:
    """``restored``'s leaves in ``target``'s dtypes and tree (static fields included)."""

    def cast(x: Any, ref: Any) -> Any:
        dtype = getattr(ref, "dtype", None)
        return x if dtype is None or x.dtype == dtype else x.astype(dtype)

    pairs = zip(jax.tree.leaves(restored), jax.tree.leaves(target), strict=True)
    return jax.tree.unflatten(jax.tree.structure(target), [cast(x, r) for x, r in pairs])

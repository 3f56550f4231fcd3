"""Reading snapshots a few leaves at a time, so that reconstructing holds bounded memory.

A reconstruction sums, per width, ``x_i`` times every snapshot's average in float64:
held whole, that is one float64 copy of the model per width. Here the leaves are split
into groups and the widths into batches so that the float64 sums held at once stay
under :data:`MEMORY_BUDGET` (or one width's sum of the largest leaf, if larger); each
group of leaves is read from each snapshot with orbax's partial restore (the other
leaves as ``PLACEHOLDER``) and checked against its CRC-32.
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from ema_jax import _checkpoint as ckpt
from ema_jax import _trees

PyTree = Any

# The float64 sums (and, where results are written as they finish, the finished
# results) held at once, in bytes: beyond it the widths are reconstructed in batches,
# one pass over the snapshots each. One width's sum of the largest leaf is always held.
MEMORY_BUDGET = 64 * 2**20


def elements(entry: Mapping[str, Any]) -> int:
    """The number of elements of a leaf described by ``{"shape": [...]}``."""
    return int(np.prod(entry["shape"], dtype=np.int64))


def plan(
    leaves: Mapping[str, Mapping[str, Any]],
    widths: int,
    *,
    result_bytes: int = 0,
    budget: int | None = None,
) -> tuple[list[list[str]], int]:
    """Groups of leaf paths read together, and how many widths one pass reconstructs.

    The groups are consecutive leaves of at most ``budget / widths`` float64 bytes (one
    leaf at least), so that with every width in one pass the sums of one group fit the
    budget; where a leaf alone is larger, or the results take their share, the widths
    go in batches, and the groups grow to what a batch leaves over (fewer reads).
    ``result_bytes``: what one width's finished result holds until it is handed over (0
    when the results are returned anyway). Invariant: ``batch * (largest group's
    float64 bytes + result_bytes) <= budget``, or ``batch == 1``.

    Example:
      >>> leaves = {"a": {"shape": [1000]}, "b": {"shape": [10, 10]}, "c": {"shape": [5]}}
      >>> plan(leaves, 1, budget=16000)  # every leaf in one read, the width in one pass
      ([['a', 'b', 'c']], 1)
      >>> plan(leaves, 4, budget=16000)  # 4000 bytes per group: 'a' alone, 2 widths a pass
      ([['a'], ['b', 'c']], 2)
    """
    budget = MEMORY_BUDGET if budget is None else budget
    widths = max(widths, 1)
    groups = _groups(leaves, max(budget // widths, 1))
    largest = max((8 * sum(elements(leaves[p]) for p in group) for group in groups), default=0)
    batch = min(max(1, budget // max(largest + result_bytes, 1)), widths)
    if batch < widths:  # several passes: each group may use what the batch leaves over
        groups = _groups(leaves, max((budget - batch * result_bytes) // batch, 1))
    return groups, batch


def _groups(leaves: Mapping[str, Mapping[str, Any]], per_group: int) -> list[list[str]]:
    """Consecutive leaves of at most ``per_group`` float64 bytes together (one at least)."""
    groups: list[list[str]] = []
    total = 0
    for path, entry in leaves.items():
        nbytes = 8 * elements(entry)
        if groups and total + nbytes <= per_group:
            groups[-1].append(path)
            total += nbytes
        else:
            groups.append([path])
            total = nbytes
    return groups


class Reader:
    """Reads chosen leaves of a snapshot as NumPy, checked against their CRC-32."""

    def __init__(self, manager: ocp.CheckpointManager) -> None:
        self._manager = manager
        self._handler = ocp.PyTreeCheckpointHandler()

    def read(
        self, step: int, tree: Mapping[str, Any], record: Mapping[str, Any], paths: Sequence[str]
    ) -> dict[str, np.ndarray]:
        """``{path: array}`` for the dotted ``paths`` of the snapshot at ``step``.

        Args:
          step: the snapshot's step.
          tree: orbax's tree metadata of the snapshot.
          record: ema_jax's record of the snapshot (its ``"arrays"`` hold the CRC-32s).
          paths: dotted leaf paths (``"averages.0.05.params.w"``).

        Raises:
          CorruptCheckpointError: a leaf is missing, cannot be read, or fails its CRC-32.
        """
        manager = self._manager
        where = f"snapshot step {step} in {manager.directory}"
        wanted = set(paths)
        found: set[str] = set()

        def pick(path: tuple[Any, ...], meta: Any) -> Any:
            name = _trees.leaf_path(path)
            if name not in wanted:
                return ocp.PLACEHOLDER
            found.add(name)
            return np.empty((0,), np.dtype(meta.dtype))  # only its type matters

        item = jax.tree_util.tree_map_with_path(pick, dict(tree))
        missing = [p for p in paths if p not in found]
        if missing:
            raise ckpt.corrupt(
                where, step, manager.directory, f"{missing[0]} is not in its tree", missing[0]
            )
        restore_args = jax.tree.map(
            lambda x: x if x is ocp.PLACEHOLDER else ocp.RestoreArgs(restore_type=np.ndarray),
            item,
        )
        with ckpt.quiet_storage() as quiet:  # no storage noise after a failed read
            try:
                restored = self._handler.restore(
                    ckpt.item_directory(manager, step),
                    args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args),
                )
                problem = None
            except MemoryError:
                raise
            except Exception as err:  # any failure to read is a damaged snapshot
                quiet.failed = True
                summary = ckpt.storage_summary(err)
                problem = f"an array cannot be read (its data is damaged: {summary})"
        if problem is not None:
            raise ckpt.corrupt(where, step, manager.directory, problem)
        flat, _ = jax.tree_util.tree_flatten_with_path(restored)
        arrays = {
            _trees.leaf_path(path): np.asarray(x) for path, x in flat if x is not ocp.PLACEHOLDER
        }
        saved = {p: record["arrays"][p] for p in paths if p in record["arrays"]}
        partial = {"arrays": saved, "unchecked": record.get("unchecked", [])}
        ckpt.verify(partial, arrays, where, step, manager.directory)  # a missing CRC is damage
        return arrays

    def close(self) -> None:
        self._handler.close()

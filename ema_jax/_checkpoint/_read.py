"""Reading a verified step, written once for linen, NNX, BestCheckpoints and post-hoc:
metadata -> record -> read in the saved dtypes -> verify -> cast; and the fallback from
a damaged latest step to the newest intact one."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from collections.abc import Mapping
from typing import Any
from typing import TypeVar

import orbax.checkpoint as ocp

from ema_jax._checkpoint._errors import CorruptCheckpointError
from ema_jax._checkpoint._errors import corrupt
from ema_jax._checkpoint._record import read_record
from ema_jax._checkpoint._storage import first_unreadable
from ema_jax._checkpoint._storage import item_directory
from ema_jax._checkpoint._storage import quiet_storage
from ema_jax._checkpoint._storage import storage_summary
from ema_jax._checkpoint._verify import cast_like
from ema_jax._checkpoint._verify import saved_dtypes
from ema_jax._checkpoint._verify import verify

PyTree = Any
T = TypeVar("T")

_LOG = logging.getLogger("ema_jax")
_NO_METADATA = (
    "cannot read the structure of checkpoint step {step} in {directory}: orbax reads"
    " item metadata only through a registered handler, so create the manager with"
    " ocp.CheckpointManager(directory, item_handlers=ocp.StandardCheckpointHandler())"
)


def read_metadata(
    manager: ocp.CheckpointManager, step: int, where: str
) -> tuple[Mapping[str, Any], dict[str, Any] | None]:
    """The tree metadata of a step and ema_jax's record in it (None if saved without).

    Raises CorruptCheckpointError when the metadata cannot be read or the record is
    damaged, and the registered-handler ValueError when the manager has no handler to
    read it with.
    """
    directory = manager.directory
    with quiet_storage() as hush:
        try:
            metadata = manager.item_metadata(step)
        except Exception as err:
            hush.failed = True
            problem, path = _metadata_problem(manager, step, err)
            raise corrupt(where, step, directory, problem, path) from None
        tree = getattr(metadata, "tree", metadata)
        if not isinstance(tree, Mapping):
            # orbax returns None both when the manager lacks a handler and when the
            # item's metadata file is gone or unreadable: ask a handler directly.
            try:
                ocp.PyTreeCheckpointHandler().metadata(item_directory(manager, step))
            except Exception as err:
                hush.failed = True
                problem = f"its tree metadata cannot be read ({storage_summary(err)})"
                raise corrupt(where, step, directory, problem) from None
            raise ValueError(_NO_METADATA.format(step=step, directory=directory))
    return tree, read_record(metadata, where, step, directory)


_ARRAY_IN_ERROR = re.compile(r'reading "([^"]+)/(?:\.zarray|zarr\.json)"')


def _metadata_problem(
    manager: ocp.CheckpointManager, step: int, err: BaseException
) -> tuple[str, str | None]:
    """What failed when orbax could not read a step's metadata, and the array if one:
    the tree's own file, or an array's metadata, which OCDBT keeps among the arrays'
    data (so damaged data shows first as an array whose metadata cannot be read)."""
    summary = storage_summary(err)
    found = _ARRAY_IN_ERROR.search(str(err))
    if found is not None:
        return f"{found.group(1)} cannot be read (its data is damaged: {summary})", found.group(1)
    metadata_file = item_directory(manager, step) / "_METADATA"
    try:
        readable = metadata_file.exists() and bool(metadata_file.read_text())
    except Exception:  # unreadable is what this asks
        readable = False
    if readable:
        return f"an array cannot be read (its data is damaged: {summary})", None
    return f"its metadata cannot be read ({summary})", None


def read(manager: ocp.CheckpointManager, step: int, item: PyTree, where: str) -> PyTree:
    """``manager.restore`` of ``item``; a read that fails is a CorruptCheckpointError
    naming the first array that cannot be read."""
    with quiet_storage() as quiet:
        try:
            return manager.restore(step, args=ocp.args.StandardRestore(item))
        except MemoryError:
            raise
        except Exception as err:
            quiet.failed = True
            summary = storage_summary(err)
            try:
                path = first_unreadable(item_directory(manager, step), item)
            except Exception:  # the diagnosis is a courtesy; the read failed either way
                path = None
    what = "an array" if path is None else path
    problem = f"{what} cannot be read ({summary})"
    raise corrupt(where, step, manager.directory, problem, path)


def read_verified(
    manager: ocp.CheckpointManager,
    step: int,
    target: PyTree,
    record: Mapping[str, Any],
    where: str,
) -> PyTree:
    """Reads ``target`` in the dtypes it was saved in, verifies every array against
    ``record``, and casts the result to ``target``'s dtypes."""
    restored = read(manager, step, saved_dtypes(target, record["arrays"]), where)
    verify(record, restored, where, step, manager.directory)
    return cast_like(restored, target)


def finalized_steps(manager: ocp.CheckpointManager, step: int | None) -> list[int]:
    """The steps to try, newest first: ``[step]``, or every finalized step.

    Only finalized steps are listed: the manager builds its step list with
    NameFormat.find_all ("NOTE: Ignores uncommitted checkpoints.",
    orbax/checkpoint/_src/path/step.py), whose _StandardNameFormat._build_metadata
    drops every path that temporary_paths.is_path_finalized rejects (a
    "*.orbax-checkpoint-tmp-*" directory, or one without its commit marker).

    Raises:
      FileNotFoundError: no finalized step (or none for ``step``).
    """
    manager.wait_until_finished()
    steps = sorted(manager.all_steps())
    if step is not None:
        if step not in steps:
            raise FileNotFoundError(
                f"no finalized checkpoint for step {step} in {manager.directory}; it has"
                f" steps {steps}"
            )
        return [step]
    if not steps:
        raise FileNotFoundError(f"no finalized checkpoint in {manager.directory}")
    return steps[::-1]


def newest_intact(
    manager: ocp.CheckpointManager, step: int | None, restore_step: Callable[[int], T]
) -> T:
    """``restore_step(step)``; with ``step=None`` the newest step that is intact.

    A latest step that raises CorruptCheckpointError is skipped with a warning on the
    ``"ema_jax"`` logger naming it; an explicit ``step`` raises.
    """
    steps = finalized_steps(manager, step)
    if step is not None:
        return restore_step(step)
    errors = []
    for candidate in steps:
        try:
            return restore_step(candidate)
        except CorruptCheckpointError as err:
            errors.append(err)
            _LOG.warning(
                "skipped checkpoint step %d: %s; trying the step before it", candidate, err
            )
    newest = errors[0]
    raise CorruptCheckpointError(
        f"no intact checkpoint in {manager.directory}: all {len(steps)} steps fail"
        f" verification; the newest: {newest}",
        step=newest.step,
        directory=manager.directory,
        path=newest.path,
    )

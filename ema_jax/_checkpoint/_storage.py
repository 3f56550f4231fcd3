"""The storage layer (orbax, TensorStore) as a verified restore sees it: where an item
lives, absolute paths, quiet failed reads, one-line errors, the first unreadable array."""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from ema_jax._trees import leaf_path

PyTree = Any

_STORAGE_FILES = ("/orbax/", "/tensorstore/", "/asyncio/")
_DRAIN_QUIET_S = 0.25  # after a failed read: this long without a late report ends the wait
_DRAIN_MAX_S = 2.0


def absolute(directory: Any) -> Any:
    """``directory`` as an absolute path (orbax refuses relative ones, and reports the
    refusal as an unreadable checkpoint); other kinds of path (``gs://``) as given."""
    if isinstance(directory, str | os.PathLike) and "://" not in os.fspath(directory):
        return os.path.abspath(os.fspath(directory))
    return directory


def check_manager(manager: Any, call: str) -> None:
    """Raises ValueError for a manager of a relative directory, which orbax can neither
    write nor read (it reports that as an unreadable checkpoint), or for no manager."""
    directory = getattr(manager, "directory", None)
    if directory is None or not callable(getattr(manager, "all_steps", None)):
        raise TypeError(
            f"{call}: manager must be an orbax.checkpoint.CheckpointManager, got"
            f" {type(manager).__name__}"
        )
    path = os.fspath(directory)
    if "://" not in path and not os.path.isabs(path):
        raise ValueError(
            f"{call}: the manager's directory {path!r} is relative, and orbax reads and"
            " writes absolute paths only: create the manager with"
            f" ocp.CheckpointManager(os.path.abspath({path!r}), ...)"
        )


def item_directory(manager: ocp.CheckpointManager, step: int) -> epath.Path:
    """Where the manager keeps the default item of a finalized ``step``."""
    # The manager's step naming (prefix, zero padding) is not public; orbax's default
    # is what CheckpointManagerOptions builds when none is given.
    name_format = getattr(manager, "_step_name_format", None) or ocp.step.standard_name_format()
    path = ocp.step.find_step_path(manager.directory, name_format, step=step)
    return path / ocp.checkpoint_manager.DEFAULT_ITEM_NAME


def _is_storage_noise(unraisable: Any) -> bool:
    """An exception orbax's or TensorStore's abandoned coroutines raise when collected."""
    files = []
    tb = unraisable.exc_traceback
    while tb is not None:
        files.append(tb.tb_frame.f_code.co_filename)
        tb = tb.tb_next
    code = getattr(unraisable.object, "cr_code", None)
    if code is not None:
        files.append(code.co_filename)
    return any(part in f.replace("\\", "/") for f in files for part in _STORAGE_FILES)


class _Quiet:
    """What a ``quiet_storage`` block tells it: set ``failed`` when a read failed."""

    failed = False


@contextlib.contextmanager
def quiet_storage() -> Iterator[_Quiet]:
    """Keeps the storage layer's reports about a failed read off the terminal.

    A failed orbax read logs through absl, and orbax closes its event loop while
    other TensorStore reads of the same batch are still in flight: when they finish,
    their callbacks raise "Event loop is closed" and Python prints each one
    ("Exception ignored in"); abandoned coroutines do the same when collected. The
    caller raises one CorruptCheckpointError instead. After a failure (the block sets
    ``failed``) this waits, up to ``_DRAIN_MAX_S``, until no such report has come for
    ``_DRAIN_QUIET_S``; a read still in flight after that (slow remote storage) may
    yet print one. Unraisable exceptions from elsewhere go to the previous hook.
    """
    loggers = [logging.getLogger(name) for name in ("absl", "asyncio")]
    levels = [logger.level for logger in loggers]
    previous = sys.unraisablehook
    last_noise = [time.monotonic()]

    def hook(unraisable: Any) -> None:
        if _is_storage_noise(unraisable):
            last_noise[0] = time.monotonic()
        else:
            previous(unraisable)

    quiet = _Quiet()
    sys.unraisablehook = hook
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield quiet
    finally:
        if quiet.failed:  # a failed read leaves abandoned coroutines: collect them now,
            gc.collect()  # while the hook still drops their noise (0.2 s: not on success)
            start = last_noise[0] = time.monotonic()
            while time.monotonic() - start < _DRAIN_MAX_S:
                if time.monotonic() - last_noise[0] >= _DRAIN_QUIET_S:
                    break
                time.sleep(0.01)
                gc.collect()
        sys.unraisablehook = previous
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def storage_summary(err: BaseException) -> str:
    """The storage layer's error in one line, without TensorStore's spec dump."""
    text = str(err).strip().split("\n", 1)[0]
    for spec in (" See full TensorStore details", " [tensorstore_spec="):
        text = text.split(spec, 1)[0]
    return f"{type(err).__name__}: {text[:300]}"


def first_unreadable(item_dir: Any, item: PyTree) -> str | None:
    """The first leaf of ``item`` (flattening order) that orbax cannot read, or None.

    Bisects over prefixes of the leaves, reading the others as orbax's PLACEHOLDER, so
    it costs about log2(leaves) partial reads; used only after a read has failed.
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(item)
    restore_args = jax.tree.leaves(ocp.checkpoint_utils.construct_restore_args(item))
    checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())

    def readable(count: int) -> bool:
        skip = [ocp.PLACEHOLDER] * (len(flat) - count)
        leaves = [leaf for _, leaf in flat[:count]] + skip
        args = restore_args[:count] + skip
        try:
            checkpointer.restore(
                item_dir,
                args=ocp.args.PyTreeRestore(
                    item=jax.tree.unflatten(treedef, leaves),
                    restore_args=jax.tree.unflatten(treedef, args),
                ),
            )
        except Exception:  # any failure to read is what this looks for
            return False
        return True

    try:
        good, bad = 0, len(flat)
        if bad == 0 or readable(bad):
            return None
        while bad - good > 1:
            middle = (good + bad) // 2
            good, bad = (middle, bad) if readable(middle) else (good, middle)
        return leaf_path(flat[bad - 1][0])
    finally:
        checkpointer.close()  # its thread pool and event loop, failed reads or not

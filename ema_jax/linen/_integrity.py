"""What makes a restored checkpoint trustworthy: checksums of its arrays and the EMA's settings.

orbax 0.12.8 writes each array through TensorStore as zarr v2 chunks, zstd-compressed
without zstd's content checksum, into an OCDBT database
(``_build_zarr2_metadata`` and ``_build_zarr3_metadata`` in
orbax/checkpoint/_src/serialization/tensorstore_utils.py). Its zarr v3 layout puts a
``crc32c`` codec on the shard index only, and neither layout lets a caller add codecs,
so a flipped byte inside an array's data decodes to wrong numbers without an error.
ema_jax therefore records, at save time, a CRC-32 of every array's bytes in the
checkpoint's own metadata (orbax's ``custom_metadata``, written with the tree structure
in the item's ``_METADATA`` file) and compares it with what comes back on restore.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import sys
import time
import zlib
from collections.abc import Iterator
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

PyTree = Any

RECORD_KEY = "ema_jax"  # the key of ema_jax's record in a checkpoint's custom metadata
RECORD_FORMAT = 1
COMPARED_SETTINGS = ("schedule", "ema_dtype")  # what decides the EMA's numbers
_STORAGE_FILES = ("/orbax/", "/tensorstore/", "/asyncio/")
_DRAIN_QUIET_S = 0.25  # after a failed read: this long without a late report ends the wait
_DRAIN_MAX_S = 2.0
_FETCH_BYTES = 256 * 2**20  # checksums copy arrays to the host in batches of this size


class CorruptCheckpointError(OSError):
    """A checkpoint step that fails verification or cannot be read.

    An ``OSError``, like ``gzip.BadGzipFile``: the bytes on storage are damaged, as a
    missing checkpoint (``FileNotFoundError``) is absent. The message names the step,
    the directory and the first array (in the tree's flattening order) that is wrong
    or unreadable; the same are in ``step``, ``directory`` and ``path``.
    """

    def __init__(self, message: str, *, step: int | None, directory: Any, path: str | None) -> None:
        super().__init__(message)
        self.step = step
        self.directory = directory
        self.path = path


class EmaSettingsMismatchError(ValueError):
    """A checkpoint's EMA has another schedule or ``ema_dtype`` than the target's EMA."""


def key_name(key: Any) -> str:
    """One path entry as orbax names it: dict keys, attribute names and indices alike."""
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def leaves_by_path(tree: PyTree) -> dict[str, Any]:
    """``{"params.Dense_0.kernel": leaf}`` in flattening order; None subtrees have no leaves.

    Orbax stores a tuple as a list, a NamedTuple or dataclass as a dict of its fields,
    so the dotted names of a target and of its checkpoint's metadata agree.
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {".".join(key_name(k) for k in path): leaf for path, leaf in flat}


def _whole(x: Any) -> Any:
    """A leaf's whole value, still on its devices, or None where this process lacks a part.

    In a multi-process run only replicated arrays are whole on every process; the
    shards of the others are spread over processes, so they are not checksummed.
    """
    if isinstance(x, jax.ShapeDtypeStruct):
        return None
    if isinstance(x, jax.Array):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        if not x.is_fully_addressable:
            return x.addressable_data(0) if x.is_fully_replicated else None
        if jax.process_count() > 1 and not x.is_fully_replicated:
            return None  # process-local: other processes hold other values
    return x


def _host_arrays(tree: PyTree) -> Iterator[tuple[str, np.ndarray]]:
    """``(path, value on the host)`` of every leaf this process holds whole, in order.

    Fetched in batches of about ``_FETCH_BYTES`` (one transfer per batch, host memory
    bounded by a batch or the largest leaf).
    """
    batch: list[tuple[str, Any]] = []
    size = 0
    for path, leaf in leaves_by_path(tree).items():
        x = _whole(leaf)
        if x is None:
            continue
        batch.append((path, x))
        size += int(np.prod(np.shape(x))) * np.dtype(getattr(x, "dtype", np.float64)).itemsize
        if size >= _FETCH_BYTES:
            yield from _fetch(batch)
            batch, size = [], 0
    yield from _fetch(batch)


def _fetch(batch: list[tuple[str, Any]]) -> Iterator[tuple[str, np.ndarray]]:
    fetched = jax.device_get([x for _, x in batch])
    for (path, _), x in zip(batch, fetched, strict=True):
        yield path, np.asarray(x)


def _crc32(data: np.ndarray) -> str:
    """CRC-32 of the little-endian, C-order bytes of an array, as 8 hex digits."""
    data = np.ascontiguousarray(data)
    if sys.byteorder == "big" and data.dtype.itemsize > 1:
        data = data.byteswap()
    return f"{zlib.crc32(data.reshape(-1).view(np.uint8).data):08x}"


def checksums(tree: PyTree) -> dict[str, dict[str, Any]]:
    """``{path: {"dtype", "shape", "crc32"}}`` of every leaf this process holds whole."""
    return {path: _describe(data) for path, data in _host_arrays(tree)}


def _describe(data: np.ndarray) -> dict[str, Any]:
    return {"dtype": data.dtype.name, "shape": list(data.shape), "crc32": _crc32(data)}


def make_record(tree: PyTree, ema_settings: Mapping[str, Any] | None) -> dict[str, Any]:
    """What ``save`` stores beside the arrays: their checksums and the EMA's settings."""
    record: dict[str, Any] = {"format": RECORD_FORMAT, "arrays": checksums(tree)}
    if ema_settings is not None:
        record["ema"] = _json_ready(ema_settings)
    return record


def _json_ready(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples as lists), to compare like with like."""
    return json.loads(json.dumps(value))


def corrupt(
    where: str, step: int, directory: Any, problem: str, path: str | None = None
) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"{where} is corrupt: {problem}", step=step, directory=directory, path=path
    )


def read_record(metadata: Any, where: str, step: int, directory: Any) -> dict[str, Any] | None:
    """ema_jax's record in a step's metadata; None for a checkpoint saved without it."""
    custom = getattr(metadata, "custom_metadata", None)
    if not isinstance(custom, Mapping) or RECORD_KEY not in custom:
        return None
    record = custom[RECORD_KEY]
    arrays = record.get("arrays") if isinstance(record, Mapping) else None
    valid = isinstance(arrays, Mapping) and all(
        isinstance(a, Mapping) and {"dtype", "shape", "crc32"} <= set(a) for a in arrays.values()
    )
    if not valid or not isinstance(record.get("ema", {}), Mapping):
        raise corrupt(where, step, directory, f"its {RECORD_KEY!r} record is malformed")
    return dict(record)


def saved_dtypes(target: PyTree, arrays: Mapping[str, Any]) -> PyTree:
    """``target`` with each leaf that was saved in another dtype replaced by a
    ``ShapeDtypeStruct`` of the saved dtype (on the target leaf's sharding), so that the
    bytes read are the bytes checksummed."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(target)
    leaves = []
    for path, leaf in flat:
        saved = arrays.get(".".join(key_name(k) for k in path))
        dtype = jnp.dtype(saved["dtype"]) if saved is not None else None
        if dtype is None or dtype == jnp.dtype(leaf.dtype):
            leaves.append(leaf)
        else:
            sharding = getattr(leaf, "sharding", None)
            leaves.append(jax.ShapeDtypeStruct(leaf.shape, dtype, sharding=sharding))
    return jax.tree.unflatten(treedef, leaves)


def verify(
    arrays: Mapping[str, Any], restored: PyTree, where: str, step: int, directory: Any
) -> None:
    """Raises CorruptCheckpointError at the first restored array unlike the one saved."""
    got = leaves_by_path(restored)
    for path, data in _host_arrays(restored):
        saved = arrays.get(path)
        if saved is None:
            continue
        have = _describe(data)
        for field in ("dtype", "shape", "crc32"):
            if have[field] != saved[field]:
                raise corrupt(
                    where,
                    step,
                    directory,
                    f"{path} reads back with {field} {have[field]}, but was saved with"
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


def ema_changes(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Each difference in the compared settings, with both values."""
    current = _json_ready(current)
    changes = []
    for key in COMPARED_SETTINGS:
        old, new = saved.get(key), current.get(key)
        if isinstance(old, Mapping) and isinstance(new, Mapping):
            names = list(new) + [name for name in old if name not in new]
            changes += [
                f"{key}.{name} is {old.get(name)!r} in the checkpoint but {new.get(name)!r}"
                " in the target"
                for name in names
                if old.get(name) != new.get(name)
            ]
        elif old != new:
            changes.append(f"{key} is {old!r} in the checkpoint but {new!r} in the target")
    return changes


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

    good, bad = 0, len(flat)
    if bad == 0 or readable(bad):
        return None
    while bad - good > 1:
        middle = (good + bad) // 2
        good, bad = (middle, bad) if readable(middle) else (good, middle)
    return ".".join(key_name(k) for k in flat[bad - 1][0])

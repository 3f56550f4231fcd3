"""ema_jax's record in a checkpoint's custom metadata: a CRC-32 of every array, the EMA's settings.

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

import json
import sys
import zlib
from collections.abc import Iterator
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from ema_jax._checkpoint._errors import corrupt
from ema_jax._trees import leaves_by_path

PyTree = Any

RECORD_KEY = "ema_jax"  # the key of ema_jax's record in a checkpoint's custom metadata
RECORD_FORMAT = 1
_FETCH_BYTES = 256 * 2**20  # checksums copy arrays to the host in batches of this size


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


def host_arrays(tree: PyTree) -> Iterator[tuple[str, np.ndarray]]:
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


def crc32(data: np.ndarray) -> str:
    """CRC-32 of the little-endian, C-order bytes of an array, as 8 hex digits."""
    data = np.ascontiguousarray(data)
    if sys.byteorder == "big" and data.dtype.itemsize > 1:
        data = data.byteswap()
    return f"{zlib.crc32(data.reshape(-1).view(np.uint8).data):08x}"


def describe(data: np.ndarray) -> dict[str, Any]:
    """``{"dtype", "shape", "crc32"}`` of one array on the host."""
    return {"dtype": data.dtype.name, "shape": list(data.shape), "crc32": crc32(data)}


def checksums(tree: PyTree) -> dict[str, dict[str, Any]]:
    """``{path: {"dtype", "shape", "crc32"}}`` of every leaf this process holds whole."""
    return {path: describe(data) for path, data in host_arrays(tree)}


def unchecked(tree: PyTree, arrays: Mapping[str, Any]) -> list[str]:
    """The leaves of ``tree`` without a checksum (spread over processes): listed in the
    record, so that a checksum missing from it is damage, not a sharded array."""
    return [path for path in leaves_by_path(tree) if path not in arrays]


def make_record(tree: PyTree, ema_settings: Mapping[str, Any] | None) -> dict[str, Any]:
    """What a save stores beside the arrays: their checksums and the EMA's settings.

    Example:
      >>> import numpy as np
      >>> record = make_record({"w": np.zeros(2, np.float32)}, None)
      >>> record["arrays"], record["unchecked"]
      ({'w': {'dtype': 'float32', 'shape': [2], 'crc32': '6522df69'}}, [])
    """
    arrays = checksums(tree)
    record: dict[str, Any] = {"format": RECORD_FORMAT, "arrays": arrays}
    record["unchecked"] = unchecked(tree, arrays)
    if ema_settings is not None:
        record["ema"] = json_ready(ema_settings)
    return record


def json_ready(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples as lists), to compare like with like."""
    return json.loads(json.dumps(value))


def read_record(metadata: Any, where: str, step: int, directory: Any) -> dict[str, Any] | None:
    """ema_jax's record in a step's metadata; None for a checkpoint saved without it.

    Raises CorruptCheckpointError for a record this version cannot check in full: an
    unknown ``format`` (a newer ema_jax, or an edit) or entries that lack a field.
    """
    custom = getattr(metadata, "custom_metadata", None)
    if not isinstance(custom, Mapping) or RECORD_KEY not in custom:
        return None
    record = custom[RECORD_KEY]
    if not isinstance(record, Mapping):
        raise corrupt(where, step, directory, f"its {RECORD_KEY!r} record is malformed")
    if record.get("format") != RECORD_FORMAT:
        raise corrupt(
            where,
            step,
            directory,
            f"its {RECORD_KEY!r} record has format {record.get('format')!r}, and this"
            f" ema_jax verifies format {RECORD_FORMAT} only (written by another version,"
            " or edited)",
        )
    arrays = record.get("arrays")
    valid = isinstance(arrays, Mapping) and all(
        isinstance(a, Mapping) and {"dtype", "shape", "crc32"} <= set(a) for a in arrays.values()
    )
    listed = record.get("unchecked", [])
    valid = valid and isinstance(listed, list) and all(isinstance(p, str) for p in listed)
    if not valid or not isinstance(record.get("ema", {}), Mapping):
        raise corrupt(where, step, directory, f"its {RECORD_KEY!r} record is malformed")
    return dict(record)

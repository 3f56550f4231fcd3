"""Verified orbax checkpoints, for every adapter: no Flax here.

``linen`` (``save_checkpoint``, ``restore_checkpoint``, ``BestCheckpoints``), ``nnx``
(``save_checkpoint``, ``restore_checkpoint``) and ``posthoc`` (snapshots) all save and
read through this package and import nothing private from each other.

What lives where:

- ``_errors``: :class:`CorruptCheckpointError`, :class:`EmaSettingsMismatchError` and
  ``corrupt`` (the one spelling of "step N in DIR is corrupt: ...").
- ``_record``: ema_jax's record in a checkpoint's custom metadata (key ``"ema_jax"``):
  a CRC-32 of every array, the leaves left unchecked (spread over processes), the
  EMA's settings; writing it and reading it back strictly (an unknown ``format`` or a
  malformed entry is damage).
- ``_settings``: the EMA's settings in a checkpoint against the target's (schedule,
  ``ema_dtype``, number of averages, the averaged leaves' dtypes) and what
  ``allow_ema_change`` lets through.
- ``_verify``: reading in the saved dtypes, checking every array against its CRC-32,
  casting to the target's dtypes.
- ``_storage``: the orbax item layout (where a step's item lives), absolute paths,
  keeping the storage layer's noise off the terminal after a failed read, one-line
  storage errors, the first unreadable array.
- ``_read``: the read -> verify -> cast path written once (``read_metadata``,
  ``read``, ``read_verified``) and the fallback from a damaged latest step to the
  newest intact one (``newest_intact``).

Tree fit (does a checkpoint fit the target) and leaf paths are ``ema_jax._trees``'s,
shared with the transform and the NNX wrapper.
"""

from ema_jax._checkpoint._errors import CorruptCheckpointError
from ema_jax._checkpoint._errors import EmaSettingsMismatchError
from ema_jax._checkpoint._errors import corrupt
from ema_jax._checkpoint._read import finalized_steps
from ema_jax._checkpoint._read import newest_intact
from ema_jax._checkpoint._read import read
from ema_jax._checkpoint._read import read_metadata
from ema_jax._checkpoint._read import read_verified
from ema_jax._checkpoint._record import RECORD_FORMAT
from ema_jax._checkpoint._record import RECORD_KEY
from ema_jax._checkpoint._record import json_ready
from ema_jax._checkpoint._record import make_record
from ema_jax._checkpoint._record import read_record
from ema_jax._checkpoint._settings import check_settings
from ema_jax._checkpoint._settings import dtype_changes
from ema_jax._checkpoint._settings import ema_changes
from ema_jax._checkpoint._settings import log_allowed
from ema_jax._checkpoint._storage import absolute
from ema_jax._checkpoint._storage import check_manager
from ema_jax._checkpoint._storage import item_directory
from ema_jax._checkpoint._storage import quiet_storage
from ema_jax._checkpoint._storage import storage_summary
from ema_jax._checkpoint._verify import cast_like
from ema_jax._checkpoint._verify import saved_dtypes
from ema_jax._checkpoint._verify import verify

__all__ = [
    "RECORD_FORMAT",
    "RECORD_KEY",
    "CorruptCheckpointError",
    "EmaSettingsMismatchError",
    "absolute",
    "cast_like",
    "check_manager",
    "check_settings",
    "corrupt",
    "dtype_changes",
    "ema_changes",
    "finalized_steps",
    "item_directory",
    "json_ready",
    "log_allowed",
    "make_record",
    "newest_intact",
    "quiet_storage",
    "read",
    "read_metadata",
    "read_record",
    "read_verified",
    "saved_dtypes",
    "storage_summary",
    "verify",
]

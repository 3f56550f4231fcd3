"""The two errors a verified restore raises, and the one way to build a corruption error."""

from __future__ import annotations

from typing import Any


class CorruptCheckpointError(OSError):
    """A checkpoint step that fails verification or cannot be read.

    An ``OSError``, like ``gzip.BadGzipFile``: the bytes on storage are damaged, as a
    missing checkpoint (``FileNotFoundError``) is absent. The message names the step,
    the directory and the first array (in the tree's flattening order) that is wrong
    or unreadable; the same are in ``step``, ``directory`` and ``path``.
    """

    __module__ = "ema_jax"  # where users import it from (and where tracebacks say it is)

    def __init__(self, message: str, *, step: int | None, directory: Any, path: str | None) -> None:
        super().__init__(message)
        self.step = step
        self.directory = directory
        self.path = path


class EmaSettingsMismatchError(ValueError):
    """A checkpoint's EMA has another schedule, ``ema_dtype``, leaf dtype or number of
    averages than the target's EMA."""

    __module__ = "ema_jax"


def corrupt(
    where: str, step: int, directory: Any, problem: str, path: str | None = None
) -> CorruptCheckpointError:
    """``CorruptCheckpointError("<where> is corrupt: <problem>")``."""
    return CorruptCheckpointError(
        f"{where} is corrupt: {problem}", step=step, directory=directory, path=path
    )

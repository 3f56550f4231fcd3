"""Verified orbax checkpoints of NNX objects (model, optimizer, :class:`Ema`): save, restore.

The NNX twin of ``ema_jax.save_checkpoint``/``restore_checkpoint``: one orbax item
holding the objects' state as a plain nested dict (``nnx.to_pure_dict(nnx.state(
objects))``), whose custom metadata holds a CRC-32 of every array and the settings of
every :class:`~ema_jax.nnx.Ema` among the objects, checked by ``ema_jax._checkpoint``
before anything is written back into the objects.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from ema_jax import _checkpoint as ckpt
from ema_jax import _validate
from ema_jax._checkpoint import RECORD_KEY
from ema_jax._trees import fit_problem
from ema_jax._trees import leaves_by_path
from ema_jax.nnx._ema import Ema

PyTree = Any

EMAS_KEY = "nnx_emas"  # the record's entry: {path of an Ema among the objects: its settings}
_LOG = logging.getLogger("ema_jax")
_UNVERIFIED = (
    "it was saved without ema_jax.nnx.save_checkpoint, so its arrays cannot be verified"
    " and its EMA settings cannot be compared"
)


def _check_objects(objects: Any, call: str) -> None:
    leaves = [
        leaf for leaf in _object_leaves(objects) if not isinstance(leaf, nnx.Pytree | nnx.Variable)
    ]
    if leaves or not _object_leaves(objects):
        got = "nothing" if not leaves else f"{type(leaves[0]).__name__} {leaves[0]!r:.60}"
        raise TypeError(
            f"{call}: objects must be NNX objects or a pytree of them (e.g. {{'model':"
            f" model, 'optimizer': optimizer, 'ema': ema}}), got {got}"
        )


def _object_leaves(objects: Any) -> list[Any]:
    return jax.tree.leaves(objects, is_leaf=lambda x: isinstance(x, nnx.Pytree | nnx.Variable))


def _is_key(x: Any) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _key_data(tree: PyTree) -> PyTree:
    """``tree`` with RNG keys (``nnx.Rngs`` streams) as their key data: what orbax stores."""

    def data(x: Any) -> Any:
        if not _is_key(x):
            return x
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.eval_shape(jax.random.key_data, x)
        return jax.random.key_data(x)

    return jax.tree.map(data, tree)


def _wrap_keys(restored: PyTree, target: PyTree) -> PyTree:
    """The key data read back as keys of the target's implementation."""

    def wrap(x: Any, ref: Any) -> Any:
        if not _is_key(ref):
            return x
        impl = getattr(ref.dtype, "_impl", None) if isinstance(ref, jax.ShapeDtypeStruct) else None
        return jax.random.wrap_key_data(x, impl=impl or jax.random.key_impl(ref))

    return jax.tree.map(wrap, restored, target)


def _emas(objects: Any) -> dict[str, Ema]:
    """Every :class:`Ema` among the objects, by its path in the objects' state."""
    return {
        ".".join(str(key) for key in path): node
        for path, node in nnx.iter_graph(objects)
        if isinstance(node, Ema)
    }


def save_checkpoint(
    manager: ocp.CheckpointManager,
    step: int,
    objects: Any,
    *,
    metrics: Mapping[str, float] | None = None,
    custom_metadata: Mapping[str, Any] | None = None,
) -> bool:
    """Saves the state of NNX objects at ``step`` with what :func:`restore_checkpoint` verifies.

    One orbax item of ``nnx.to_pure_dict(nnx.state(objects))`` whose custom metadata
    also holds a CRC-32 of every array's bytes and the settings of every
    :class:`~ema_jax.nnx.Ema` among ``objects`` (``ema.transform.settings()``). Call
    it where you would call ``manager.save``, on every process; variables shared
    between the objects are saved once.

    Args:
      manager: an orbax manager with one item: created with
        ``item_handlers=ocp.StandardCheckpointHandler()``, or with no handlers.
      step: the step to save as (e.g. ``int(optimizer.step[...])``).
      objects: an NNX object or any pytree of them, e.g.
        ``{"model": model, "optimizer": optimizer, "ema": ema}``.
      metrics: passed to ``manager.save`` (for ``best_fn``).
      custom_metadata: your own JSON-ready metadata for this step, read back with
        ``manager.item_metadata(step).custom_metadata``; the key ``"ema_jax"`` is
        ema_jax's.

    Returns:
      What ``manager.save`` returns: False when the manager's policy skipped the step.

    Example:
      >>> import tempfile
      >>> import optax, orbax.checkpoint as ocp
      >>> from flax import nnx
      >>> import ema_jax
      >>> from ema_jax import nnx as ema_nnx
      >>> def create():
      ...     model = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
      ...     ema = ema_nnx.Ema(model, ema_jax.ema(ema_jax.schedules.constant(0.99)))
      ...     return {"model": model, "optimizer": nnx.Optimizer(
      ...         model, optax.sgd(0.1), wrt=nnx.Param), "ema": ema}
      >>> objects = create()
      >>> with tempfile.TemporaryDirectory() as workdir:
      ...     with ocp.CheckpointManager(
      ...             workdir, item_handlers=ocp.StandardCheckpointHandler()) as manager:
      ...         saved = ema_nnx.save_checkpoint(manager, 5, objects)
      ...         step = ema_nnx.restore_checkpoint(manager, nnx.eval_shape(create))
      >>> saved, step
      (True, 5)
    """
    _check_objects(objects, "save_checkpoint")
    step = _validate.check_nonnegative_int("step", step)
    meta = dict(custom_metadata or {})
    if RECORD_KEY in meta:
        raise ValueError(f"custom_metadata must not use the key {RECORD_KEY!r}: it is ema_jax's")
    ckpt.check_manager(manager, "save_checkpoint")
    pure = _key_data(nnx.to_pure_dict(nnx.state(objects)))
    record = ckpt.make_record(pure, None)
    record[EMAS_KEY] = {path: ema.transform.settings() for path, ema in _emas(objects).items()}
    meta[RECORD_KEY] = ckpt.json_ready(record)
    return manager.save(
        step, args=ocp.args.StandardSave(pure, custom_metadata=meta), metrics=metrics
    )


def restore_checkpoint(
    manager: ocp.CheckpointManager,
    objects: Any,
    *,
    step: int | None = None,
    allow_ema_change: bool = False,
) -> int:
    """Restores NNX objects in place from a checkpoint of :func:`save_checkpoint`, verified.

    ``objects`` gives the structure, dtypes and shardings: the objects of the run
    (concrete), or abstract ones from ``nnx.eval_shape(create)``, whose variables are
    then filled with arrays. Nothing is written into them unless the step passed
    verification: every array reads back with the CRC-32 written at save time, and
    every :class:`~ema_jax.nnx.Ema` among them has the saved schedule, ``ema_dtype``,
    number of averages and averaged leaves' dtypes. With ``step=None``, a latest step
    that is corrupt or unreadable is skipped, with a warning on the ``"ema_jax"``
    logger naming it, and the newest intact step is restored; an explicit ``step``
    raises. A checkpoint saved with ``manager.save`` of the same pure dict restores
    unverified, with a warning.

    Args:
      manager: the orbax manager of the checkpoint directory, with a handler for the
        default item (``item_handlers=ocp.StandardCheckpointHandler()``).
      objects: the NNX object or pytree of them to restore into, as saved.
      step: the step to restore; None restores the newest intact one.
      allow_ema_change: accept a checkpoint whose EMA has another schedule or
        ``ema_dtype``, or averaged leaves in another dtype (you changed the EMA on
        purpose): its values are kept, cast to the target's dtype, and the target's
        settings apply from then on; a warning lists the changes. Another number of
        averages raises even so: saved averages cannot become other ones.

    Returns:
      The step restored.

    Raises:
      FileNotFoundError: no finalized checkpoint (or none for ``step``).
      CorruptCheckpointError: the step (with ``step=None``: every step) fails
        verification or cannot be read; names the step and the first bad array.
      EmaSettingsMismatchError: an EMA's settings differ (a ``ValueError``); names
        each difference.
      ValueError: the checkpoint does not fit ``objects`` (another model): names the
        first differing leaf.
    """
    _check_objects(objects, "restore_checkpoint")
    if not isinstance(allow_ema_change, bool):
        raise TypeError(f"allow_ema_change must be a bool, got {allow_ema_change!r}")
    if step is not None:
        step = _validate.check_nonnegative_int("step", step)
    ckpt.check_manager(manager, "restore_checkpoint")
    state = nnx.state(objects)
    pure = nnx.to_pure_dict(state)
    target = _key_data(pure)
    emas = {path: ema.transform.settings() for path, ema in _emas(objects).items()}

    def restore_step(at: int) -> tuple[int, PyTree]:
        return at, _restore_step(manager, at, target, emas, allow_ema_change)

    restored_step, restored = ckpt.newest_intact(manager, step, restore_step)
    nnx.replace_by_pure_dict(state, _wrap_keys(restored, pure))
    nnx.update(objects, state)
    return restored_step


def _check_fits(tree: Mapping[str, Any], target: PyTree, where: str) -> None:
    problem = fit_problem(
        leaves_by_path(tree), leaves_by_path(target), got_name="the checkpoint", want_name="objects"
    )
    if problem is not None:
        raise ValueError(
            f"{where} does not fit the objects: {problem}; is it a checkpoint of another model?"
        )


def _restore_step(
    manager: ocp.CheckpointManager,
    step: int,
    target: PyTree,
    emas: Mapping[str, Mapping[str, Any]],
    allow_ema_change: bool,
) -> PyTree:
    where = f"checkpoint step {step} in {manager.directory}"
    tree, record = ckpt.read_metadata(manager, step, where)
    if record is None:
        _check_fits(tree, target, where)
        restored = ckpt.read(manager, step, target, where)
        _LOG.warning("%s restores unverified: %s", where, _UNVERIFIED)
        return restored
    saved_emas = record.get(EMAS_KEY, {})
    if not isinstance(saved_emas, Mapping):
        raise ckpt.corrupt(where, step, manager.directory, f"its {EMAS_KEY!r} record is malformed")
    wanted = leaves_by_path(target)
    changes = []
    # The settings first: another number of averages changes the shapes, and is named
    # as what it is, not as another model.
    for path, settings in emas.items():
        if path not in saved_emas:
            continue  # the tree check names the Ema that the checkpoint lacks
        dtypes = ckpt.dtype_changes(
            record["arrays"], wanted, (f"{path}.params." if path else "params.",)
        )
        changes += ckpt.check_settings(
            saved_emas[path], settings, dtypes, where, allow_ema_change, "restore_checkpoint"
        )
    _check_fits(tree, target, where)
    restored = ckpt.read_verified(manager, step, target, record, where)
    ckpt.log_allowed(where, changes)
    return restored

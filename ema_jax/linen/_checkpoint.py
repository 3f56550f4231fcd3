"""Orbax checkpoints of an `EmaTrainState`: save, verified restore, old checkpoints, best.

Save with :func:`save_checkpoint` (the state, a checksum of every array and the EMA's
settings, in one orbax item); :func:`restore_checkpoint` checks both before it returns
anything. A checkpoint written by ``manager.save(step, args=ocp.args.StandardSave(state))``
restores as well, unverified, with a warning.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from ema_jax import _checkpoint as ckpt
from ema_jax._checkpoint import RECORD_KEY
from ema_jax._checkpoint import corrupt
from ema_jax._checkpoint import make_record
from ema_jax._trees import fit_problem
from ema_jax._trees import leaves_by_path
from ema_jax.linen._train_state import EmaTrainState

PyTree = Any

_LOG = logging.getLogger("ema_jax")
_UNVERIFIED = (
    "it was saved without ema_jax.save_checkpoint, so its arrays cannot be verified"
    " and its EMA settings cannot be compared"
)


def check_fits(saved: Mapping[str, Any], target: Mapping[str, Any], where: str) -> None:
    """Raises ValueError naming the first leaf that is missing, extra or of another shape."""
    problem = fit_problem(saved, target, got_name="the checkpoint", want_name="the target")
    if problem is not None:
        raise ValueError(
            f"{where} does not fit the target: {problem}; is it a checkpoint of another model?"
        )


def _place_like(tree: PyTree, like: PyTree) -> PyTree:
    """``tree``'s leaves in ``like``'s tree structure, on ``like``'s shardings where it has them."""

    def put(x: Any, ref: Any) -> Any:
        sharding = getattr(ref, "sharding", None)
        return x if sharding is None else jax.device_put(x, sharding)

    pairs = zip(jax.tree.leaves(tree), jax.tree.leaves(like), strict=True)
    leaves = [put(x, ref) for x, ref in pairs]
    return jax.tree.unflatten(jax.tree.structure(like), leaves)


def save_checkpoint(
    manager: ocp.CheckpointManager,
    state: EmaTrainState,
    *,
    metrics: Mapping[str, float] | None = None,
    custom_metadata: Mapping[str, Any] | None = None,
) -> bool:
    """Saves ``state`` at ``state.step`` with what :func:`restore_checkpoint` verifies.

    One orbax item, as ``manager.save(step, args=ocp.args.StandardSave(state))`` writes
    it, whose custom metadata also holds a CRC-32 of every array's bytes and the EMA's
    settings (``state.ema.settings()``). Call it where you would call ``manager.save``:
    after the train step, on every process. It copies the arrays to the host to
    checksum them (in a multi-process run, the replicated ones only) before orbax's
    own copy.

    Args:
      manager: an orbax manager with one item: created with
        ``item_handlers=ocp.StandardCheckpointHandler()``, or with no handlers.
      state: the state to save.
      metrics: passed to ``manager.save`` (for ``best_fn``).
      custom_metadata: your own JSON-ready metadata for this step, read back with
        ``manager.item_metadata(step).custom_metadata``; the key ``"ema_jax"`` is
        ema_jax's.

    Returns:
      What ``manager.save`` returns: False when the manager's policy skipped the step
      (a step at or before its latest is never saved).

    Example:
      >>> import tempfile
      >>> import flax.linen as nn, jax, jax.numpy as jnp, optax
      >>> import orbax.checkpoint as ocp
      >>> import ema_jax
      >>> model = nn.Dense(2)
      >>> params = model.init(jax.random.key(0), jnp.ones((1, 3)))["params"]
      >>> ema = ema_jax.ema(ema_jax.schedules.constant(0.99))
      >>> state = ema_jax.EmaTrainState.create(
      ...     apply_fn=model.apply, params=params, tx=optax.sgd(0.1), ema=ema)
      >>> with tempfile.TemporaryDirectory() as workdir:
      ...     with ocp.CheckpointManager(
      ...             workdir, item_handlers=ocp.StandardCheckpointHandler()) as manager:
      ...         saved = ema_jax.save_checkpoint(manager, state)
      ...         restored = ema_jax.restore_checkpoint(manager, state)  # verified
      >>> saved, int(restored.ema_state.step)
      (True, 0)
    """
    if not isinstance(state, EmaTrainState):
        raise TypeError(f"state must be an ema_jax.EmaTrainState, got {type(state).__name__}")
    meta = dict(custom_metadata or {})
    if RECORD_KEY in meta:
        raise ValueError(f"custom_metadata must not use the key {RECORD_KEY!r}: it is ema_jax's")
    ckpt.check_manager(manager, "save_checkpoint")
    meta[RECORD_KEY] = make_record(state, state.ema.settings())
    return manager.save(
        int(state.step), args=ocp.args.StandardSave(state, custom_metadata=meta), metrics=metrics
    )


def restore_checkpoint(
    manager: ocp.CheckpointManager,
    target: EmaTrainState,
    *,
    step: int | None = None,
    allow_ema_change: bool = False,
) -> EmaTrainState:
    """Restores an :class:`~ema_jax.EmaTrainState`, EMA included, and verifies it.

    ``target`` gives the structure, dtypes and shardings of the result: a concrete state,
    or an abstract one from ``jax.eval_shape`` whose leaves may be
    ``jax.ShapeDtypeStruct(shape, dtype, sharding=...)`` so that every array is read
    straight onto its devices. Static fields (``apply_fn``, ``tx``, ``ema``) come from
    ``target``.

    A checkpoint saved with :func:`save_checkpoint` is verified: every array must
    read back with the CRC-32 written at save time, and the EMA's schedule and
    ``ema_dtype`` must be the target's. With ``step=None``, a latest step that is
    corrupt or unreadable is skipped, with a warning on the ``"ema_jax"`` logger
    naming it, and the newest intact step is restored; an explicit ``step`` raises.
    Nothing that fails verification is ever returned.

    A checkpoint saved with ``manager.save(step, args=ocp.args.StandardSave(state))``
    restores unverified, with a warning. One written from a plain flax ``TrainState``
    (no ``ema_state``; with ``batch_stats`` when the target has them) restores ``step``,
    ``params``, ``opt_state`` and ``batch_stats``, and starts the EMA from the restored
    weights with its step set to ``step``, so the update cadence and warmup continue,
    as pycls does for checkpoints without EMA weights; a warning says so.

    Args:
      manager: the orbax manager of the checkpoint directory. It must have a handler
        for the default item: one that saved or restored already, or one created
        with ``item_handlers=ocp.StandardCheckpointHandler()``.
      target: the state to restore into, concrete or abstract.
      step: the step to restore; None restores the newest intact one.
      allow_ema_change: accept a checkpoint whose EMA has another schedule or
        ``ema_dtype`` than ``target.ema``, or averaged leaves in another dtype (a
        float32 EMA restored into bfloat16 parameters with ``ema_dtype=None``); you
        changed the EMA on purpose: its values are kept, cast to the target's dtype,
        and the target's settings apply from then on; a warning lists the changes.
        Another number of averages raises even so.

    Returns:
      The restored state.

    Raises:
      FileNotFoundError: no finalized checkpoint (or none for ``step``) in the
        manager's directory.
      CorruptCheckpointError: the step (with ``step=None``: every step) fails
        verification or cannot be read; names the step and the first bad array.
      EmaSettingsMismatchError: the checkpoint's EMA has another schedule,
        ``ema_dtype``, number of averages, or averaged leaves in another dtype (a
        ``ValueError``); names each difference.
      ValueError: the checkpoint does not fit ``target`` (another model): names the
        first differing leaf.

    Example:
      >>> import tempfile
      >>> import flax.linen as nn, jax, jax.numpy as jnp, optax
      >>> import orbax.checkpoint as ocp
      >>> import ema_jax
      >>> model = nn.Dense(2)
      >>> ema = ema_jax.normalized_ema(ema_alpha=1e-3, batch_size=32, max_epoch=10)
      >>> def init():
      ...     params = model.init(jax.random.key(0), jnp.ones((1, 3)))["params"]
      ...     return ema_jax.EmaTrainState.create(
      ...         apply_fn=model.apply, params=params, tx=optax.sgd(0.1), ema=ema)
      >>> state = init()
      >>> with tempfile.TemporaryDirectory() as workdir:
      ...     with ocp.CheckpointManager(
      ...             workdir, item_handlers=ocp.StandardCheckpointHandler()) as manager:
      ...         _ = ema_jax.save_checkpoint(manager, state)
      ...     with ocp.CheckpointManager(
      ...             workdir, item_handlers=ocp.StandardCheckpointHandler()) as manager:
      ...         restored = ema_jax.restore_checkpoint(manager, jax.eval_shape(init))
      >>> int(restored.ema_state.step)
      0
    """
    if not isinstance(target, EmaTrainState):
        raise TypeError(f"target must be an ema_jax.EmaTrainState, got {type(target).__name__}")
    if not isinstance(allow_ema_change, bool):
        raise TypeError(f"allow_ema_change must be a bool, got {allow_ema_change!r}")
    ckpt.check_manager(manager, "restore_checkpoint")
    return ckpt.newest_intact(
        manager, step, lambda at: _restore_step(manager, target, at, allow_ema_change)
    )


def _restore_step(
    manager: ocp.CheckpointManager, target: EmaTrainState, step: int, allow_ema_change: bool
) -> EmaTrainState:
    directory = manager.directory
    where = f"checkpoint step {step} in {directory}"
    tree, record = ckpt.read_metadata(manager, step, where)
    if tree.get("ema_state") is None:
        if record is not None and "ema" in record:  # save_checkpoint wrote an EmaTrainState
            raise corrupt(where, step, directory, "its tree has lost ema_state", "ema_state")
        return _restore_plain(manager, target, step, tree, where)

    wanted = leaves_by_path(target)
    if record is None:
        check_fits(leaves_by_path(tree), wanted, where)
        restored = ckpt.read(manager, step, target, where)
        _LOG.warning("%s restores unverified: %s", where, _UNVERIFIED)
        return restored
    # The settings first: another number of averages changes the shapes, and is named
    # as what it is rather than as another model.
    changes = ckpt.check_settings(
        record.get("ema"),
        target.ema.settings(),
        ckpt.dtype_changes(record["arrays"], wanted, ("ema_state.ema.",)),
        where,
        allow_ema_change,
        "restore_checkpoint",
    )
    check_fits(leaves_by_path(tree), wanted, where)
    restored = ckpt.read_verified(manager, step, target, record, where)
    ckpt.log_allowed(where, changes)
    return restored


def _restore_plain(
    manager: ocp.CheckpointManager,
    target: EmaTrainState,
    step: int,
    tree: Mapping[str, Any],
    where: str,
) -> EmaTrainState:
    """A plain TrainState checkpoint: restores the raw state, starts the EMA from it."""
    raw = {"step": target.step, "params": target.params, "opt_state": target.opt_state}
    if "batch_stats" in tree:
        raw["batch_stats"] = target.batch_stats
    expected = leaves_by_path(target)
    check_fits(
        leaves_by_path(tree),
        {p: x for p, x in expected.items() if not p.startswith("ema_state.")},
        where,
    )
    restored = ckpt.read(manager, step, raw, where)
    batch_stats = restored.get("batch_stats")
    variables = {"params": restored["params"]}
    if batch_stats is not None:
        variables["batch_stats"] = batch_stats
    ema_state = target.ema.init(variables)
    ema_state = ema_state._replace(step=jnp.asarray(restored["step"], jnp.int32))
    _LOG.warning(
        "%s has no EMA (a plain TrainState checkpoint): the EMA starts from its raw"
        " weights, with the EMA's step set to %d; it has no checksums, so it restores"
        " unverified",
        where,
        int(ema_state.step),
    )
    return target.replace(
        step=restored["step"],
        params=restored["params"],
        opt_state=restored["opt_state"],
        batch_stats=batch_stats,
        ema_state=_place_like(ema_state, target.ema_state),
    )

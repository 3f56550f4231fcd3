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
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from ema_jax.linen._integrity import RECORD_KEY
from ema_jax.linen._integrity import CorruptCheckpointError
from ema_jax.linen._integrity import EmaSettingsMismatchError
from ema_jax.linen._integrity import cast_like
from ema_jax.linen._integrity import corrupt
from ema_jax.linen._integrity import ema_changes
from ema_jax.linen._integrity import first_unreadable
from ema_jax.linen._integrity import leaves_by_path
from ema_jax.linen._integrity import make_record
from ema_jax.linen._integrity import quiet_storage
from ema_jax.linen._integrity import read_record
from ema_jax.linen._integrity import saved_dtypes
from ema_jax.linen._integrity import storage_summary
from ema_jax.linen._integrity import verify
from ema_jax.linen._train_state import EmaTrainState

PyTree = Any

_LOG = logging.getLogger("ema_jax")
_NO_METADATA = (
    "cannot read the structure of checkpoint step {step} in {directory}: orbax reads"
    " item metadata only through a registered handler, so create the manager with"
    " ocp.CheckpointManager(directory, item_handlers=ocp.StandardCheckpointHandler())"
)
_UNVERIFIED = (
    "it was saved without ema_jax.save_checkpoint, so its arrays cannot be verified"
    " and its EMA settings cannot be compared"
)


def _shape(x: Any) -> tuple[int, ...]:
    """The shape of an array, a ``jax.ShapeDtypeStruct``, orbax metadata or a scalar."""
    shape = getattr(x, "shape", None)
    return tuple(np.shape(x) if shape is None else shape)


def check_fits(saved: dict[str, Any], target: dict[str, Any], where: str) -> None:
    """Raises ValueError naming the first leaf that is missing, extra or of another shape."""
    problem = None
    for path, leaf in target.items():
        if path not in saved:
            problem = f"the target's leaf {path} is not in the checkpoint"
        elif _shape(saved[path]) != _shape(leaf):
            problem = (
                f"{path} has shape {_shape(saved[path])} in the checkpoint but"
                f" {_shape(leaf)} in the target"
            )
        if problem is not None:
            break
    extra = [path for path in saved if path not in target]
    if problem is None and extra:
        problem = f"the checkpoint's leaf {extra[0]} is not in the target"
    if problem is not None:
        missing = [path for path in target if path not in saved]
        counts = f"{len(missing)} missing, {len(extra)} extra of {len(target)} target leaves"
        raise ValueError(
            f"{where} does not fit the target: {problem} ({counts});"
            " is it a checkpoint of another model?"
        )


def _place_like(tree: PyTree, like: PyTree) -> PyTree:
    """``tree``'s leaves in ``like``'s tree structure, on ``like``'s shardings where it has them."""

    def put(x: Any, ref: Any) -> Any:
        sharding = getattr(ref, "sharding", None)
        return x if sharding is None else jax.device_put(x, sharding)

    pairs = zip(jax.tree.leaves(tree), jax.tree.leaves(like), strict=True)
    leaves = [put(x, ref) for x, ref in pairs]
    return jax.tree.unflatten(jax.tree.structure(like), leaves)


def _item_directory(manager: ocp.CheckpointManager, step: int) -> epath.Path:
    """Where the manager keeps the default item of a finalized ``step``."""
    # The manager's step naming (prefix, zero padding) is not public; orbax's default
    # is what CheckpointManagerOptions builds when none is given.
    name_format = getattr(manager, "_step_name_format", None) or ocp.step.standard_name_format()
    path = ocp.step.find_step_path(manager.directory, name_format, step=step)
    return path / ocp.checkpoint_manager.DEFAULT_ITEM_NAME


def read_metadata(
    manager: ocp.CheckpointManager, step: int, where: str
) -> tuple[Mapping[str, Any], dict[str, Any] | None]:
    """The tree metadata of a step and ema_jax's record in it (None if saved without).

    Raises CorruptCheckpointError when the metadata cannot be read, and the
    registered-handler ValueError when the manager has no handler to read it with.
    """
    directory = manager.directory
    with quiet_storage() as quiet:
        try:
            metadata = manager.item_metadata(step)
        except Exception as err:
            quiet.failed = True
            problem = f"its metadata cannot be read ({storage_summary(err)})"
            raise corrupt(where, step, directory, problem) from None
        tree = getattr(metadata, "tree", metadata)
        if not isinstance(tree, Mapping):
            # orbax returns None both when the manager lacks a handler and when the
            # item's metadata file is gone or unreadable: ask a handler directly.
            try:
                ocp.PyTreeCheckpointHandler().metadata(_item_directory(manager, step))
            except Exception as err:
                quiet.failed = True
                problem = f"its tree metadata cannot be read ({storage_summary(err)})"
                raise corrupt(where, step, directory, problem) from None
            raise ValueError(_NO_METADATA.format(step=step, directory=directory))
    return tree, read_record(metadata, where, step, directory)


def read(manager: ocp.CheckpointManager, step: int, item: PyTree, where: str) -> PyTree:
    """``manager.restore`` of ``item``; a read that fails is a CorruptCheckpointError."""
    with quiet_storage() as quiet:
        try:
            return manager.restore(step, args=ocp.args.StandardRestore(item))
        except MemoryError:
            raise
        except Exception as err:
            quiet.failed = True
            summary = storage_summary(err)
            try:
                path = first_unreadable(_item_directory(manager, step), item)
            except Exception:  # the diagnosis is a courtesy; the read failed either way
                path = None
    what = "an array" if path is None else path
    problem = f"{what} cannot be read ({summary})"
    raise corrupt(where, step, manager.directory, problem, path)


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
        ``ema_dtype`` than ``target.ema`` (you changed the EMA on purpose): its values
        are kept, cast to the target's dtype, and the target's settings apply from
        then on; a warning lists the changes.

    Returns:
      The restored state.

    Raises:
      FileNotFoundError: no finalized checkpoint (or none for ``step``) in the
        manager's directory.
      CorruptCheckpointError: the step (with ``step=None``: every step) fails
        verification or cannot be read; names the step and the first bad array.
      EmaSettingsMismatchError: the checkpoint's EMA has another schedule or
        ``ema_dtype`` (a ``ValueError``); names each difference.
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
    manager.wait_until_finished()
    directory = manager.directory
    # Only finalized steps are listed: the manager builds its step list with
    # NameFormat.find_all ("NOTE: Ignores uncommitted checkpoints.",
    # orbax/checkpoint/_src/path/step.py), whose _StandardNameFormat._build_metadata
    # drops every path that temporary_paths.is_path_finalized rejects (a
    # "*.orbax-checkpoint-tmp-*" directory, or one without its commit marker).
    steps = sorted(manager.all_steps())
    if step is not None:
        if step not in steps:
            raise FileNotFoundError(
                f"no finalized checkpoint for step {step} in {directory}; it has steps {steps}"
            )
        return _restore_step(manager, target, step, allow_ema_change)
    if not steps:
        raise FileNotFoundError(f"no finalized checkpoint in {directory}")
    errors = []
    for candidate in reversed(steps):
        try:
            return _restore_step(manager, target, candidate, allow_ema_change)
        except CorruptCheckpointError as err:
            errors.append(err)
            _LOG.warning(
                "skipped checkpoint step %d: %s; trying the step before it", candidate, err
            )
    newest = errors[0]
    raise CorruptCheckpointError(
        f"no intact checkpoint in {directory}: all {len(steps)} steps fail verification;"
        f" the newest: {newest}",
        step=newest.step,
        directory=directory,
        path=newest.path,
    )


def _restore_step(
    manager: ocp.CheckpointManager, target: EmaTrainState, step: int, allow_ema_change: bool
) -> EmaTrainState:
    directory = manager.directory
    where = f"checkpoint step {step} in {directory}"
    tree, record = read_metadata(manager, step, where)
    saved = leaves_by_path(tree)
    if tree.get("ema_state") is None:
        if record is not None and "ema" in record:  # save_checkpoint wrote an EmaTrainState
            raise corrupt(where, step, directory, "its tree has lost ema_state", "ema_state")
        return _restore_plain(manager, target, step, tree, where)

    check_fits(saved, leaves_by_path(target), where)
    if record is None:
        restored = read(manager, step, target, where)
        _LOG.warning("%s restores unverified: %s", where, _UNVERIFIED)
        return restored
    changes = ema_changes(record["ema"], target.ema.settings()) if "ema" in record else []
    if changes and not allow_ema_change:
        raise EmaSettingsMismatchError(
            f"{where} holds an EMA with other settings than the target's: "
            + "; ".join(changes)
            + ". To keep its EMA values and continue with the target's settings, pass"
            " allow_ema_change=True to restore_checkpoint"
        )
    restored = read(manager, step, saved_dtypes(target, record["arrays"]), where)
    verify(record["arrays"], restored, where, step, directory)
    if changes:
        _LOG.warning(
            "%s: the EMA's settings change (%s); its values are kept, in the target's"
            " dtype, and the target's settings apply from now on",
            where,
            "; ".join(changes),
        )
    return cast_like(restored, target)


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
    restored = read(manager, step, raw, where)
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

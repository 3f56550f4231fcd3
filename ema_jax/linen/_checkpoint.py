"""Orbax checkpoints of an `EmaTrainState`: resume, old checkpoints, best raw and EMA.

Saving needs no helper: an :class:`~ema_jax.EmaTrainState` is a pytree of arrays
(the transform and ``apply_fn`` are static), so orbax saves it as it is, the EMA
and its step included::

    manager.save(int(state.step), args=ocp.args.StandardSave(state))
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Mapping
from typing import Any
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from ema_jax.linen._train_state import EmaTrainState

PyTree = Any
Which = Literal["raw", "ema"]

_LOG = logging.getLogger("ema_jax")
_NO_METADATA = (
    "cannot read the structure of checkpoint step {step} in {directory}: orbax reads"
    " item metadata only through a registered handler, so create the manager with"
    " ocp.CheckpointManager(directory, item_handlers=ocp.StandardCheckpointHandler())"
)


def _key_name(key: Any) -> str:
    """One path entry as orbax names it: dict keys, attribute names and indices alike."""
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _leaves_by_path(tree: PyTree) -> dict[str, Any]:
    """``{"params.Dense_0.kernel": leaf}`` in flattening order; None subtrees have no leaves.

    Orbax stores a tuple as a list, a NamedTuple or dataclass as a dict of its fields,
    so the dotted names of a target and of its checkpoint's metadata agree.
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {".".join(_key_name(k) for k in path): leaf for path, leaf in flat}


def _shape(x: Any) -> tuple[int, ...]:
    """The shape of an array, a ``jax.ShapeDtypeStruct``, orbax metadata or a scalar."""
    shape = getattr(x, "shape", None)
    return tuple(np.shape(x) if shape is None else shape)


def _check_fits(saved: dict[str, Any], target: dict[str, Any], where: str) -> None:
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


def restore_checkpoint(
    manager: ocp.CheckpointManager, target: EmaTrainState, *, step: int | None = None
) -> EmaTrainState:
    """Restores an :class:`~ema_jax.EmaTrainState`, EMA included, from an orbax checkpoint.

    ``target`` gives the structure, dtypes and shardings of the result: a concrete state,
    or an abstract one from ``jax.eval_shape`` whose leaves may be
    ``jax.ShapeDtypeStruct(shape, dtype, sharding=...)`` so that every array is read
    straight onto its devices. Static fields (``apply_fn``, ``tx``, ``ema``) come from
    ``target``.

    A checkpoint written from a plain flax ``TrainState`` (no ``ema_state``; with
    ``batch_stats`` when the target has them) restores ``step``, ``params``,
    ``opt_state`` and ``batch_stats``, and starts the EMA from the restored weights
    with its step set to ``step``, so the update cadence and warmup continue, as pycls
    does for checkpoints without EMA weights. It says so in a warning on the
    ``"ema_jax"`` logger.

    Save with orbax itself: ``manager.save(int(state.step),
    args=ocp.args.StandardSave(state))``.

    Args:
      manager: the orbax manager of the checkpoint directory. It must have a handler
        for the default item: one that saved or restored already, or one created
        with ``item_handlers=ocp.StandardCheckpointHandler()``.
      target: the state to restore into, concrete or abstract.
      step: the step to restore; None restores the latest.

    Returns:
      The restored state.

    Raises:
      FileNotFoundError: no finalized checkpoint (or none for ``step``) in the
        manager's directory.
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
      ...         _ = manager.save(int(state.step), args=ocp.args.StandardSave(state))
      ...     with ocp.CheckpointManager(
      ...             workdir, item_handlers=ocp.StandardCheckpointHandler()) as manager:
      ...         restored = ema_jax.restore_checkpoint(manager, jax.eval_shape(init))
      >>> int(restored.ema_state.step)
      0
    """
    if not isinstance(target, EmaTrainState):
        raise TypeError(f"target must be an ema_jax.EmaTrainState, got {type(target).__name__}")
    manager.wait_until_finished()
    directory = manager.directory
    # Only finalized steps are listed: the manager builds its step list with
    # NameFormat.find_all ("NOTE: Ignores uncommitted checkpoints.",
    # orbax/checkpoint/_src/path/step.py), whose _StandardNameFormat._build_metadata
    # drops every path that temporary_paths.is_path_finalized rejects (a
    # "*.orbax-checkpoint-tmp-*" directory, or one without its commit marker).
    steps = list(manager.all_steps())
    if step is None:
        step = manager.latest_step()
        if step is None:
            raise FileNotFoundError(f"no finalized checkpoint in {directory}")
    elif step not in steps:
        raise FileNotFoundError(
            f"no finalized checkpoint for step {step} in {directory}; it has steps {steps}"
        )
    metadata = manager.item_metadata(step)
    tree = getattr(metadata, "tree", metadata)
    if not isinstance(tree, Mapping):
        raise ValueError(_NO_METADATA.format(step=step, directory=directory))
    saved = _leaves_by_path(tree)
    where = f"checkpoint step {step} in {directory}"
    if tree.get("ema_state") is not None:
        _check_fits(saved, _leaves_by_path(target), where)
        return manager.restore(step, args=ocp.args.StandardRestore(target))

    # A plain TrainState checkpoint: restore the raw state, start the EMA from it.
    raw = {"step": target.step, "params": target.params, "opt_state": target.opt_state}
    if "batch_stats" in tree:
        raw["batch_stats"] = target.batch_stats
    expected = _leaves_by_path(target)
    _check_fits(saved, {p: x for p, x in expected.items() if not p.startswith("ema_state.")}, where)
    restored = manager.restore(step, args=ocp.args.StandardRestore(raw))
    batch_stats = restored.get("batch_stats")
    variables = {"params": restored["params"]}
    if batch_stats is not None:
        variables["batch_stats"] = batch_stats
    ema_state = target.ema.init(variables)
    ema_state = ema_state._replace(step=jnp.asarray(restored["step"], jnp.int32))
    _LOG.warning(
        "%s has no EMA (a plain TrainState checkpoint): the EMA starts from its raw"
        " weights, with the EMA's step set to %d",
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


def _rank(metrics: Mapping[str, float], *, name: str, worst: float) -> float:
    """Orbax's ``best_fn``: the metric, with NaN ranked worst (a diverged evaluation)."""
    value = float(metrics[name])
    return worst if math.isnan(value) else value


class BestCheckpoints:
    """Keeps the best raw weights and the best EMA weights, each by its own metric.

    pycls's "best" checkpoint tracks the raw and the EMA model separately; here two
    orbax managers under ``directory`` (``raw/`` and ``ema/``) each keep one
    checkpoint of evaluation variables (``{"params": ..., "batch_stats": ...}``,
    no optimizer state): the raw weights ranked by ``metrics[raw_metric]``, the EMA
    weights by ``metrics[ema_metric]``. On a tie the later step is kept (orbax's
    ``best_fn`` with ``max_to_keep=1``); a NaN metric ranks worst. Reopening the
    directory, e.g. on resume, continues the ranking.

    Args:
      directory: where to keep the two checkpoints (created if missing).
      raw_metric: the key of the raw weights' metric in ``save``'s ``metrics``.
      ema_metric: the key of the EMA weights' metric.
      mode: ``"max"`` (accuracy) or ``"min"`` (error, loss).

    Example:
      >>> import tempfile
      >>> import flax.linen as nn, jax, jax.numpy as jnp, optax
      >>> import ema_jax
      >>> model = nn.Dense(2)
      >>> params = model.init(jax.random.key(0), jnp.ones((1, 3)))["params"]
      >>> ema = ema_jax.normalized_ema(ema_alpha=1e-3, batch_size=32, max_epoch=10)
      >>> state = ema_jax.EmaTrainState.create(
      ...     apply_fn=model.apply, params=params, tx=optax.sgd(0.1), ema=ema)
      >>> with tempfile.TemporaryDirectory() as workdir:
      ...     with ema_jax.BestCheckpoints(workdir) as best:
      ...         for step, (acc, ema_acc) in enumerate([(0.8, 0.7), (0.6, 0.9)]):
      ...             best.save(step, state, {"accuracy": acc, "ema_accuracy": ema_acc})
      ...         best.wait_until_finished()
      ...         print(best.best_step("raw"), best.best_step("ema"))
      ...         variables = best.restore("ema", state)  # for state.apply_fn
      0 1
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        raw_metric: str = "accuracy",
        ema_metric: str = "ema_accuracy",
        mode: Literal["max", "min"] = "max",
    ) -> None:
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        for name, value in (("raw_metric", raw_metric), ("ema_metric", ema_metric)):
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name} must be a non-empty string, got {value!r}")
        self.raw_metric = raw_metric
        self.ema_metric = ema_metric
        self.mode = mode
        self.directory = os.fspath(directory)
        worst = -math.inf if mode == "max" else math.inf
        metric_of: dict[Which, str] = {"raw": raw_metric, "ema": ema_metric}
        self._managers: dict[Which, ocp.CheckpointManager] = {}
        for which, metric in metric_of.items():
            self._managers[which] = ocp.CheckpointManager(
                os.path.join(self.directory, which),
                item_handlers=ocp.StandardCheckpointHandler(),
                options=ocp.CheckpointManagerOptions(
                    max_to_keep=1,
                    best_fn=functools.partial(_rank, name=metric, worst=worst),
                    best_mode=mode,
                    keep_checkpoints_without_metrics=False,
                    create=True,
                ),
            )

    def save(self, step: int, state: EmaTrainState, metrics: Mapping[str, float]) -> None:
        """Offers the raw and the EMA weights at ``step``; each is kept if it is the best.

        Call it after evaluating, with the metrics of both. Saving a step that is
        already kept does nothing, so a resumed run may repeat its last epoch.

        Raises:
          ValueError: ``metrics`` lacks ``raw_metric`` or ``ema_metric``, or a value
            is not a number.
        """
        values = {}
        for name in (self.raw_metric, self.ema_metric):
            if name not in metrics:
                raise ValueError(f"metrics must have {name!r}, got keys {sorted(metrics)}")
            try:
                values[name] = float(metrics[name])
            except (TypeError, ValueError):
                raise ValueError(
                    f"metrics[{name!r}] must be a number, got {metrics[name]!r}"
                ) from None
        for which, manager in self._managers.items():
            if int(step) not in manager.all_steps():
                item = _eval_variables(state, which)
                manager.save(int(step), args=ocp.args.StandardSave(item), metrics=values)

    def best_step(self, which: Which) -> int | None:
        """The step of the best ``"raw"`` or ``"ema"`` weights so far, or None."""
        return self._manager(which).best_step()

    def best_metrics(self, which: Which) -> dict[str, float] | None:
        """Both metrics of the kept ``"raw"`` or ``"ema"`` checkpoint, or None."""
        step = self.best_step(which)
        return None if step is None else dict(self._manager(which).metrics(step))

    def restore(self, which: Which, target: EmaTrainState) -> dict[str, PyTree]:
        """The best ``"raw"`` or ``"ema"`` weights as variables for ``target.apply_fn``.

        Args:
          which: ``"raw"`` or ``"ema"``.
          target: a state (concrete or from ``jax.eval_shape``, leaves may carry
            shardings) giving the variables' structure, dtypes and shardings.

        Returns:
          ``{"params": ..., "batch_stats": ...}`` (no ``"batch_stats"`` without them).

        Raises:
          FileNotFoundError: nothing saved yet.
          ValueError: the checkpoint does not fit ``target``.
        """
        manager = self._manager(which)
        manager.wait_until_finished()
        step = manager.best_step()
        if step is None:
            raise FileNotFoundError(f"no finalized checkpoint in {manager.directory}")
        item = _eval_variables(target, which)
        tree = getattr(manager.item_metadata(step), "tree", None)
        if not isinstance(tree, Mapping):
            raise ValueError(_NO_METADATA.format(step=step, directory=manager.directory))
        where = f"checkpoint step {step} in {manager.directory}"
        _check_fits(_leaves_by_path(tree), _leaves_by_path(item), where)
        return manager.restore(step, args=ocp.args.StandardRestore(item))

    def wait_until_finished(self) -> None:
        """Blocks until both managers' asynchronous saves are written."""
        for manager in self._managers.values():
            manager.wait_until_finished()

    def close(self) -> None:
        """Finishes pending saves and releases both managers."""
        for manager in self._managers.values():
            manager.close()

    def __enter__(self) -> BestCheckpoints:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _manager(self, which: Which) -> ocp.CheckpointManager:
        if which not in self._managers:
            raise ValueError(f"which must be 'raw' or 'ema', got {which!r}")
        return self._managers[which]


def _eval_variables(state: EmaTrainState, which: Which) -> dict[str, PyTree]:
    """The variables to evaluate with: the raw ones or the EMA's."""
    if which == "ema":
        return state.ema_variables()
    if state.batch_stats is None:
        return {"params": state.params}
    return {"params": state.params, "batch_stats": state.batch_stats}

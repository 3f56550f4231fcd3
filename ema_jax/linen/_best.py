"""`BestCheckpoints`: the best raw and the best EMA weights, each by its own metric."""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Mapping
from typing import Any
from typing import Literal

import orbax.checkpoint as ocp

from ema_jax import _checkpoint as ckpt
from ema_jax._checkpoint import RECORD_KEY
from ema_jax._checkpoint import make_record
from ema_jax._trees import leaves_by_path
from ema_jax.linen._checkpoint import check_fits
from ema_jax.linen._train_state import EmaTrainState

PyTree = Any
Which = Literal["raw", "ema"]

_LOG = logging.getLogger("ema_jax")


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
      >>> ema = ema_jax.ema(ema_jax.schedules.pycls(ema_alpha=1e-3, batch_size=32, max_epoch=10))
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
        self.directory = ckpt.absolute(directory)  # orbax refuses relative paths
        worst = -math.inf if mode == "max" else math.inf
        self._metric_of: dict[Which, str] = {"raw": raw_metric, "ema": ema_metric}
        self._managers: dict[Which, ocp.CheckpointManager] = {}
        for which, metric in self._metric_of.items():
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

        Call it after evaluating, with the metrics of both. Each kept checkpoint carries
        a CRC-32 of every array, checked by ``restore``.

        A step at or before the kept one comes from a run that was rolled back and
        resumed. Its weights replace the kept ones when their metric is strictly
        better (the kept checkpoint is deleted first: a crash in between leaves none
        of that kind until the next ``save``), and are ignored otherwise, so a resumed
        run may repeat its last epoch.

        Raises:
          TypeError: ``state`` is not an :class:`~ema_jax.EmaTrainState`.
          ValueError: ``metrics`` lacks ``raw_metric`` or ``ema_metric``, or a value
            is not a number.
        """
        if not isinstance(state, EmaTrainState):
            raise TypeError(f"state must be an ema_jax.EmaTrainState, got {type(state).__name__}")
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
        step = int(step)
        for which, manager in self._managers.items():
            manager.wait_until_finished()  # the kept step's metrics are on disk (save waits too)
            kept = manager.best_step()
            if kept is not None and step <= kept:
                if not self._better(values[self._metric_of[which]], manager.metrics(kept), which):
                    continue
                _LOG.info(
                    "best %s weights: step %d (rolled back) beats the kept step %d; replacing it",
                    which,
                    step,
                    kept,
                )
                manager.delete(kept)
            item = _eval_variables(state, which)
            meta = {RECORD_KEY: make_record(item, None)}
            manager.save(
                step, args=ocp.args.StandardSave(item, custom_metadata=meta), metrics=values
            )

    def _better(self, value: float, kept: Mapping[str, float] | None, which: Which) -> bool:
        """Whether ``value`` ranks strictly above the kept checkpoint's metric."""
        if kept is None:
            return True
        worst = -math.inf if self.mode == "max" else math.inf
        rank = functools.partial(_rank, name=self._metric_of[which], worst=worst)
        new, old = rank({self._metric_of[which]: value}), rank(kept)
        return new > old if self.mode == "max" else new < old

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
          TypeError: ``target`` is not an :class:`~ema_jax.EmaTrainState`.
          FileNotFoundError: nothing saved yet.
          CorruptCheckpointError: the kept checkpoint fails its checksums or cannot
            be read (there is no older one to fall back to).
          ValueError: the checkpoint does not fit ``target``.
        """
        manager = self._manager(which)
        if not isinstance(target, EmaTrainState):
            raise TypeError(
                "target must be an ema_jax.EmaTrainState (concrete or from jax.eval_shape),"
                f" got {type(target).__name__}"
            )
        manager.wait_until_finished()
        step = manager.best_step()
        if step is None:
            raise FileNotFoundError(f"no finalized checkpoint in {manager.directory}")
        item = _eval_variables(target, which)
        where = f"checkpoint step {step} in {manager.directory}"
        tree, record = ckpt.read_metadata(manager, step, where)
        check_fits(leaves_by_path(tree), leaves_by_path(item), where)
        if record is None:  # kept by an ema_jax that did not checksum
            return ckpt.read(manager, step, item, where)
        return ckpt.read_verified(manager, step, item, record, where)

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

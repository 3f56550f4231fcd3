"""`EmaTrainState`: a flax `TrainState` that carries an EMA of its weights."""

from __future__ import annotations

from collections.abc import Iterable
from collections.abc import Mapping
from typing import Any
from typing import cast

import jax
import jax.numpy as jnp
import optax
from flax import struct
from flax.training import train_state

from ema_jax import _accumulation
from ema_jax._batch_stats import NUM_SAMPLES
from ema_jax._bema import Bema
from ema_jax._transform import Ema
from ema_jax._transform import EmaState
from ema_jax.linen._precise_bn import precise_batch_stats_pair

PyTree = Any


class EmaTrainState(train_state.TrainState):
    """A flax ``TrainState`` whose ``apply_gradients`` also updates an EMA of the weights.

    The EMA covers the parameters and, when the model has them, the BatchNorm
    statistics (pycls averages the whole state dict). The transform ``ema`` is
    static; its state ``ema_state`` is part of the pytree, so it is jitted, donated
    and checkpointed with the rest.

    Gradient accumulation: with ``tx = optax.MultiSteps(opt, every_k_schedule=k)``
    the weights change only on every k-th call of ``apply_gradients``, and the EMA
    is updated on those calls only (a ``lax.cond`` on the optimizer's own state, no
    host sync): its cadence and warmup count optimizer steps, not micro-batches.
    Build the EMA for optimizer steps: ``batch_size`` is the global batch of one
    optimizer step (k micro-batches together), ``steps_per_epoch`` counts optimizer
    steps.

    Attributes:
      step: calls of ``apply_gradients`` (flax's meaning): micro-batches under
        ``optax.MultiSteps``, optimizer steps otherwise. ``ema_state.step`` counts
        the optimizer steps that applied.
      ema: the transform from :func:`ema_jax.ema`, :func:`ema_jax.normalized_ema` or
        :func:`ema_jax.bema` (static).
      ema_state: its :class:`~ema_jax.EmaState` (a ``BemaState`` for ``bema``);
        ``ema_state.ema`` is
        ``{"params": ..., "batch_stats": ...}`` (no ``"batch_stats"`` without them).
      batch_stats: the model's BatchNorm statistics, or None.

    Example:
      >>> import flax.linen as nn, jax, jax.numpy as jnp, optax
      >>> import ema_jax
      >>> model = nn.Dense(2)
      >>> params = model.init(jax.random.key(0), jnp.ones((1, 3)))["params"]
      >>> ema = ema_jax.ema(ema_jax.schedules.pycls(ema_alpha=1e-3, batch_size=32,
      ...                                               max_epoch=10, update_period=1))
      >>> state = ema_jax.EmaTrainState.create(
      ...     apply_fn=model.apply, params=params, tx=optax.sgd(0.1), ema=ema)
      >>> grads = jax.tree.map(jnp.ones_like, params)
      >>> state = jax.jit(lambda s, g: s.apply_gradients(grads=g), donate_argnums=0)(
      ...     state, grads)
      >>> int(state.step), int(state.ema_state.step)
      (1, 1)
      >>> logits = state.apply_fn({"params": state.ema_params}, jnp.ones((1, 3)))
    """

    ema: Ema = struct.field(pytree_node=False)  # or a Bema: the same interface
    ema_state: EmaState = struct.field(pytree_node=True)  # a BemaState for a Bema
    batch_stats: PyTree = struct.field(pytree_node=True, default=None)

    @property
    def ema_params(self) -> PyTree:
        """The EMA of the parameters, shaped like ``params``: evaluate with these.

        With several averages (``ema_jax.ema((s1, s2, ...))``), pick one with
        :meth:`ema_variables` instead.
        """
        return self.ema_variables()["params"]

    @property
    def ema_batch_stats(self) -> PyTree:
        """The EMA of the BatchNorm statistics, or None when the model has none."""
        return self.ema_variables().get("batch_stats")

    def ema_variables(self, which: int | str | None = None) -> dict[str, PyTree]:
        """``{"params": ..., "batch_stats": ...}`` of the EMA, for ``apply_fn``.

        Args:
          which: with several averages, the one to evaluate (its index or name).
        """
        return dict(self.ema.average(self.ema_state.ema, which))

    def apply_gradients(
        self, *, grads: PyTree, batch_stats: PyTree = None, **kwargs: Any
    ) -> EmaTrainState:
        """Applies the optimizer, then folds the new weights into the EMA.

        Args:
          grads: gradients shaped like ``params``.
          batch_stats: the BatchNorm statistics the forward pass returned; required
            when the state has ``batch_stats``, refused when it has none.
          **kwargs: other fields to ``replace``, as in flax.

        Returns:
          The new state, ``step`` advanced by one (saturating), ``ema_state``
          updated by ``ema.update`` if the optimizer applied its update (always,
          unless ``tx`` is an ``optax.MultiSteps`` still accumulating).
        """
        if (batch_stats is None) != (self.batch_stats is None):
            has = "has" if self.batch_stats is not None else "has no"
            raise ValueError(
                f"apply_gradients got batch_stats={_describe(batch_stats)}, but the state"
                f" {has} batch_stats: pass the forward pass's new batch_stats exactly when"
                " the model has them"
            )
        new = super().apply_gradients(grads=grads, **kwargs)
        stats = batch_stats if batch_stats is not None else self.batch_stats
        variables = _variables(new.params, stats)
        applied = _optimizer_applied(self.opt_state, new.opt_state)
        if applied is None:
            ema_state = self.ema.update(variables, self.ema_state)
        else:
            ema_state = jax.lax.cond(
                applied, self.ema.update, lambda _, state: state, variables, self.ema_state
            )
        return new.replace(
            step=optax.safe_increment(jnp.asarray(self.step, jnp.int32)),
            batch_stats=stats,
            ema_state=ema_state,
        )

    def with_precise_batch_stats(
        self,
        batches: Iterable[Any],
        *,
        num_samples: int = NUM_SAMPLES,
        apply_kwargs: Mapping[str, Any] | None = None,
    ) -> EmaTrainState:
        """pycls's end of epoch: precise BatchNorm statistics for the raw and the EMA model.

        pycls's trainer, after every epoch with ``BN.USE_PRECISE_STATS`` (its default),
        calls ``compute_precise_bn_stats`` on the model and on the EMA model, which
        overwrites both models' running statistics. This does the same with
        :func:`ema_jax.precise_batch_stats` (see there for the exact statistics),
        in one pass over ``batches`` and one compilation for both models.

        The EMA's recomputed statistics replace the averaged ones inside
        ``ema_state``, as pycls overwrites the EMA model's buffers: the EMA's later
        updates keep averaging from there, and ``ema_variables()`` evaluates the EMA
        weights with statistics computed under those weights. Averaged statistics
        belong to no single set of weights; these belong to the EMA's. Evaluate the
        EMA with its averaged statistics (``ema_variables()``) before this call to
        compare the two.

        Call it outside the jitted train step, after an epoch, with training batches;
        then evaluate and checkpoint the returned state. ``step`` and everything
        but the two sets of BatchNorm statistics are unchanged.

        Args:
          batches: an iterable of model inputs (see :func:`ema_jax.precise_batch_stats`),
            consumed once.
          num_samples: pycls's ``BN.NUM_SAMPLES_PRECISE``.
          apply_kwargs: keyword arguments that put the model in training mode;
            default ``{"train": True}``.

        Returns:
          The state with ``batch_stats`` and ``ema_batch_stats`` recomputed.

        Raises:
          ValueError: the state has no ``batch_stats``, or any error of
            :func:`ema_jax.precise_batch_stats`.

        Example:
          >>> import flax.linen as nn, jax, jax.numpy as jnp, optax
          >>> import ema_jax
          >>> class Net(nn.Module):
          ...     @nn.compact
          ...     def __call__(self, x, train=True):
          ...         return nn.BatchNorm(use_running_average=not train)(nn.Dense(2)(x))
          >>> model = Net()
          >>> variables = model.init(jax.random.key(0), jnp.ones((1, 3)))
          >>> ema = ema_jax.ema(ema_jax.schedules.pycls(ema_alpha=1e-3, batch_size=4,
          ...                                               max_epoch=10))
          >>> state = ema_jax.EmaTrainState.create(
          ...     apply_fn=model.apply, params=variables["params"],
          ...     batch_stats=variables["batch_stats"], tx=optax.sgd(0.1), ema=ema)
          >>> batches = [jax.random.normal(jax.random.key(i), (4, 3)) for i in range(3)]
          >>> state = state.with_precise_batch_stats(batches)
          >>> logits = state.apply_fn(state.ema_variables(), batches[0], train=False)
        """
        if self.batch_stats is None:
            raise ValueError(
                "with_precise_batch_stats needs a state with batch_stats, but this one has"
                " none: the model has no BatchNorm statistics to recompute"
            )
        raw = {"params": self.params, "batch_stats": self.batch_stats}
        raw_stats, ema_stats = precise_batch_stats_pair(
            self.apply_fn,
            raw,
            self.ema_variables(),
            batches,
            num_samples=num_samples,
            apply_kwargs=apply_kwargs,
        )
        ema = {**self.ema_state.ema, "batch_stats": ema_stats}
        return self.replace(batch_stats=raw_stats, ema_state=self.ema_state._replace(ema=ema))

    @classmethod
    def create(  # type: ignore[override]  # `ema` is required: it is what this class adds
        cls,
        *,
        apply_fn: Any,
        params: PyTree,
        tx: optax.GradientTransformation,
        ema: Ema | Bema,
        batch_stats: PyTree = None,
        **kwargs: Any,
    ) -> EmaTrainState:
        """A new state at step 0, with the EMA a copy of ``params`` (and ``batch_stats``).

        ``step`` is an int32 array, not flax's Python ``0``, so that a jitted train
        step compiles once for the whole run.
        """
        if not isinstance(ema, Ema | Bema):
            raise TypeError(
                "ema must be a transform from ema_jax.ema(schedule) (or"
                f" ema_jax.normalized_ema, ema_jax.bema), got {ema!r}"
            )
        if not (callable(getattr(tx, "init", None)) and callable(getattr(tx, "update", None))):
            raise TypeError(
                f"tx must be an optax.GradientTransformation (with init and update), got {tx!r}"
            )
        return cls(
            step=jnp.zeros((), jnp.int32),
            apply_fn=apply_fn,
            params=params,
            tx=tx,
            opt_state=tx.init(params),
            ema=cast(Any, ema),  # a Bema has Ema's interface
            ema_state=cast(Any, ema.init(_variables(params, batch_stats))),
            batch_stats=batch_stats,
            **kwargs,
        )


def _variables(params: PyTree, batch_stats: PyTree) -> dict[str, PyTree]:
    """The collections the EMA averages: params, and batch_stats when there are any."""
    if batch_stats is None:
        return {"params": params}
    return {"params": params, "batch_stats": batch_stats}


def _optimizer_applied(before: PyTree, after: PyTree) -> jax.Array | None:
    """Whether the optimizer applied an update (a traced bool), or None if it always does.

    None unless ``opt_state`` holds an ``optax.MultiStepsState``; then the rule of
    :func:`ema_jax._accumulation.applied_between`.
    """
    old = _accumulation.multi_steps_state(before, "EmaTrainState")
    if old is None:
        return None
    new = _accumulation.multi_steps_state(after, "EmaTrainState")
    assert new is not None  # the optimizer keeps its state's structure
    return _accumulation.applied_between(old, new)


def _describe(tree: PyTree) -> str:
    if tree is None:
        return "None"
    return f"a tree of {len(jax.tree.leaves(tree))} leaves"

"""`EmaTrainState`: a flax `TrainState` that carries a `normalized_ema` of its weights."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct
from flax.training import train_state

from ema_jax._transform import EmaState
from ema_jax._transform import NormalizedEma

PyTree = Any


class EmaTrainState(train_state.TrainState):
    """A flax ``TrainState`` whose ``apply_gradients`` also updates an EMA of the weights.

    The EMA covers the parameters and, when the model has them, the BatchNorm
    statistics (pycls averages the whole state dict). The transform ``ema`` is
    static; its state ``ema_state`` is part of the pytree, so it is jitted, donated
    and checkpointed with the rest.

    Attributes:
      ema: the :class:`~ema_jax.NormalizedEma` transform (static).
      ema_state: its :class:`~ema_jax.EmaState`; ``ema_state.ema`` is
        ``{"params": ..., "batch_stats": ...}`` (no ``"batch_stats"`` without them).
      batch_stats: the model's BatchNorm statistics, or None.

    Example:
      >>> import flax.linen as nn, jax, jax.numpy as jnp, optax
      >>> import ema_jax
      >>> model = nn.Dense(2)
      >>> params = model.init(jax.random.key(0), jnp.ones((1, 3)))["params"]
      >>> ema = ema_jax.normalized_ema(ema_alpha=1e-3, batch_size=32, max_epoch=10,
      ...                              update_period=1)
      >>> state = ema_jax.EmaTrainState.create(
      ...     apply_fn=model.apply, params=params, tx=optax.sgd(0.1), ema=ema)
      >>> grads = jax.tree.map(jnp.ones_like, params)
      >>> state = jax.jit(lambda s, g: s.apply_gradients(grads=g), donate_argnums=0)(
      ...     state, grads)
      >>> int(state.step), int(state.ema_state.step)
      (1, 1)
      >>> logits = state.apply_fn({"params": state.ema_params}, jnp.ones((1, 3)))
    """

    ema: NormalizedEma = struct.field(pytree_node=False)
    ema_state: EmaState = struct.field(pytree_node=True)
    batch_stats: PyTree = struct.field(pytree_node=True, default=None)

    @property
    def ema_params(self) -> PyTree:
        """The EMA of the parameters, shaped like ``params``: evaluate with these."""
        return self.ema_state.ema["params"]

    @property
    def ema_batch_stats(self) -> PyTree:
        """The EMA of the BatchNorm statistics, or None when the model has none."""
        return self.ema_state.ema.get("batch_stats")

    def ema_variables(self) -> dict[str, PyTree]:
        """``{"params": ema_params, "batch_stats": ema_batch_stats}`` for ``apply_fn``."""
        return dict(self.ema_state.ema)

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
          updated by ``ema.update``.
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
        ema_state = self.ema.update(_variables(new.params, stats), self.ema_state)
        return new.replace(
            step=optax.safe_increment(jnp.asarray(self.step, jnp.int32)),
            batch_stats=stats,
            ema_state=ema_state,
        )

    @classmethod
    def create(  # type: ignore[override]  # `ema` is required: it is what this class adds
        cls,
        *,
        apply_fn: Any,
        params: PyTree,
        tx: optax.GradientTransformation,
        ema: NormalizedEma,
        batch_stats: PyTree = None,
        **kwargs: Any,
    ) -> EmaTrainState:
        """A new state at step 0, with the EMA a copy of ``params`` (and ``batch_stats``).

        ``step`` is an int32 array, not flax's Python ``0``, so that a jitted train
        step compiles once for the whole run.
        """
        if not isinstance(ema, NormalizedEma):
            raise TypeError(f"ema must be a transform from ema_jax.normalized_ema, got {ema!r}")
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
            ema=ema,
            ema_state=ema.init(_variables(params, batch_stats)),
            batch_stats=batch_stats,
            **kwargs,
        )


def _variables(params: PyTree, batch_stats: PyTree) -> dict[str, PyTree]:
    """The collections the EMA averages: params, and batch_stats when there are any."""
    if batch_stats is None:
        return {"params": params}
    return {"params": params, "batch_stats": batch_stats}


def _describe(tree: PyTree) -> str:
    if tree is None:
        return "None"
    return f"a tree of {len(jax.tree.leaves(tree))} leaves"

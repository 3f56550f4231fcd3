"""Gradient accumulation: did an ``optax.MultiSteps`` optimizer apply its update?

Framework-free (JAX and optax only). Under ``optax.MultiSteps(opt, every_k_schedule=k)``
the weights change on every k-th call only, and an EMA must be updated on those calls
only, so that its cadence and warmup count optimizer steps. Both answers below are
traced booleans, for a ``lax.cond``: no host sync.

- :func:`applied_between` reads the optimizer state before and after the call
  (a train state that holds both, as ``EmaTrainState.apply_gradients`` does);
- :func:`applied_after` reads it after the call only (``ema_jax.nnx.Ema.update``,
  called after ``nnx.Optimizer.update`` has replaced the state).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

PyTree = Any


def _is_multi_steps(x: Any) -> bool:
    return isinstance(x, optax.MultiStepsState)


def multi_steps_state(opt_state: PyTree, where: str) -> optax.MultiStepsState | None:
    """The one ``optax.MultiStepsState`` inside ``opt_state``, or None if there is none.

    Raises:
      ValueError: ``opt_state`` holds several (``where`` names the caller).
    """
    found = [x for x in jax.tree.leaves(opt_state, is_leaf=_is_multi_steps) if _is_multi_steps(x)]
    if len(found) > 1:
        raise ValueError(
            f"opt_state holds {len(found)} optax.MultiStepsState: {where} cannot tell"
            " which one decides when the weights change; wrap the whole optimizer in one"
            " optax.MultiSteps"
        )
    return found[0] if found else None


def applied_between(before: optax.MultiStepsState, after: optax.MultiStepsState) -> jax.Array:
    """Whether the call that turned ``before`` into ``after`` applied the update.

    ``MultiSteps`` bumps ``gradient_step`` exactly when it applies, and resets
    ``mini_step`` to 0; a mini-step that ``should_skip_update_fn`` rejects changes
    neither. The reset also covers ``gradient_step`` saturating at ``2**31 - 1``.
    """
    bumped = after.gradient_step != before.gradient_step
    return bumped | ((after.mini_step == 0) & (before.mini_step != 0))


def applied_after(state: optax.MultiStepsState, where: str) -> jax.Array:
    """Whether the call that produced ``state`` applied the update, from ``state`` alone.

    An applied call leaves ``mini_step == 0``; an accumulating one ``mini_step >= 1``.
    A mini-step rejected by ``should_skip_update_fn`` leaves ``mini_step`` as it was,
    possibly 0, so the rejection is read from ``skip_state["should_skip"]``, which
    optax's ``skip_not_finite`` and ``skip_large_updates`` report. (optax's own
    ``MultiSteps.has_updated`` misses rejections.)

    Raises:
      ValueError: ``skip_state`` is not empty and has no ``"should_skip"`` entry (a
        custom ``should_skip_update_fn``): a rejection cannot be told apart.
    """
    skip_state = state.skip_state
    if isinstance(skip_state, Mapping) and "should_skip" in skip_state:
        rejected = jnp.asarray(skip_state["should_skip"], bool)
    elif not jax.tree.leaves(skip_state):  # no should_skip_update_fn: nothing is rejected
        rejected = jnp.zeros((), bool)
    else:
        raise ValueError(
            f"{where}: the optax.MultiStepsState's skip_state has no 'should_skip' entry"
            f" (got {type(skip_state).__name__} {skip_state!r:.60}), so a mini-step"
            " rejected by should_skip_update_fn cannot be told from an applied one; return"
            " {'should_skip': ..., ...} from it as optax.skip_not_finite does, or pass"
            " applied= yourself"
        )
    return (jnp.asarray(state.mini_step) == 0) & ~rejected

"""Small Flax models for the tests: one plain, one with BatchNorm."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import ema_jax

# Warmup of one 3-step epoch, then an update every 2 steps: a few steps cross the
# warmup boundary, and a resume mid-epoch and mid-cadence shows whether the step survives.
EMA = ema_jax.normalized_ema(
    ema_alpha=1e-2,
    batch_size=4,
    max_epoch=2,
    update_period=2,
    warmup_epochs=1,
    steps_per_epoch=3,
)


class Mlp(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        del train
        return nn.Dense(3)(nn.relu(nn.Dense(8)(x)))


class BnNet(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        x = nn.Dense(8)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        return nn.Dense(3)(nn.relu(x))


def make_state(model: nn.Module, ema: ema_jax.NormalizedEma, seed: int = 0):
    variables = model.init(jax.random.key(seed), jnp.ones((4, 5)))
    return ema_jax.EmaTrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        batch_stats=variables.get("batch_stats"),
        tx=optax.sgd(0.1, momentum=0.9),
        ema=ema,
    )


def train_step(state: ema_jax.EmaTrainState, x: jax.Array, y: jax.Array) -> Any:
    """One SGD step on a squared loss; updates batch_stats when the model has them."""
    has_bn = state.batch_stats is not None

    def loss_fn(params):
        variables = {"params": params}
        if has_bn:
            variables["batch_stats"] = state.batch_stats
            out, updates = state.apply_fn(variables, x, train=True, mutable=["batch_stats"])
            return jnp.mean((out - y) ** 2), updates["batch_stats"]
        return jnp.mean((state.apply_fn(variables, x) - y) ** 2), None

    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return state.apply_gradients(grads=grads, batch_stats=stats), loss


def batches(n: int, seed: int = 1) -> list[tuple[jax.Array, jax.Array]]:
    keys = jax.random.split(jax.random.key(seed), n)
    return [(jax.random.normal(k, (4, 5)), jax.random.normal(k, (4, 3)) * 0.1) for k in keys]

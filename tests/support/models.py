"""Small Flax models for the tests: linen (one plain, one with BatchNorm) and NNX."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import nnx

import ema_jax
import ema_jax.nnx

# Warmup of one 3-step epoch, then an update every 2 steps: a few steps cross the
# warmup boundary, and a resume mid-epoch and mid-cadence shows whether the step survives.
PYCLS = dict(
    ema_alpha=1e-2,
    batch_size=4,
    max_epoch=2,
    update_period=2,
    warmup_epochs=1,
    steps_per_epoch=3,
)
EMA = ema_jax.normalized_ema(**PYCLS)


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


# ------------------------------------------------------------------------------ NNX


class NnxNet(nnx.Module):
    """Linear -> BatchNorm -> relu -> Dropout -> Linear, and an integer call counter.

    Every kind of variable an EMA meets: floating ``Param`` and ``BatchStat``, an
    integer ``Variable``, and RNG state (the dropout stream).
    """

    def __init__(self, rngs: nnx.Rngs, *, width: int = 8, param_dtype: Any = jnp.float32):
        self.lin = nnx.Linear(5, width, param_dtype=param_dtype, rngs=rngs)
        self.bn = nnx.BatchNorm(width, momentum=0.9, param_dtype=param_dtype, rngs=rngs)
        self.drop = nnx.Dropout(0.1, rngs=rngs)
        self.out = nnx.Linear(width, 3, param_dtype=param_dtype, rngs=rngs)
        self.calls = nnx.Variable(jnp.zeros((), jnp.int32))

    def __call__(self, x: jax.Array) -> jax.Array:
        self.calls[...] += 1
        return self.out(self.drop(nnx.relu(self.bn(self.lin(x)))))


def nnx_setup(ema: Any = EMA, seed: int = 0, **model_kw: Any) -> tuple[Any, Any, Any]:
    """(model, optimizer, Ema) at step 0: SGD with momentum, the EMA over everything."""
    model = NnxNet(nnx.Rngs(seed), **model_kw)
    optimizer = nnx.Optimizer(model, optax.sgd(0.1, momentum=0.9), wrt=nnx.Param)
    return model, optimizer, ema_jax.nnx.Ema(model, ema)


def nnx_train_step(model: Any, optimizer: Any, ema: Any, x: jax.Array, y: jax.Array) -> Any:
    """One SGD step on a squared loss (BatchNorm statistics updated), then the EMA's."""

    def loss_fn(model: Any) -> jax.Array:
        return jnp.mean((model(x) - y) ** 2)

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    ema.update(model)
    return loss

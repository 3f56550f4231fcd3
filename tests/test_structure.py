"""What XLA compiles the EMA into: aliasing, temporaries, where the averaging lives.

Structural facts of the compiled program, no timing: the donated update writes every
EMA buffer in place, the EMA adds no parameter-sized temporaries to a train step, and
the averaging sits inside the conditional so that a non-updating call does no work
proportional to the parameters. benchmarks/bench_ema.py measures what these buy.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest
from flax.training import train_state
from support import BIG
from support import arithmetic
from support import called
from support import computations
from support import is_big

import ema_jax

# Temporaries the EMA may add, per EMA leaf. XLA:CPU's buffer assignment shows what they
# are: the conditional's operand and result tuples (a table of 8-byte pointers per
# leaf) and, with skip_nonfinite, each leaf's count scalar at 64-byte
# alignment. All scale with the number of leaves and none with the leaves' sizes
# (test_update_temporaries_do_not_grow_with_the_parameters checks that directly).
TEMP_BYTES_PER_LEAF = 512


def tree(scale: int = 1, dtype=jnp.float32) -> dict[str, jax.Array]:
    return {
        "w": jnp.ones((64, 128 * scale), dtype),
        "b": jnp.ones((BIG * scale,), dtype),
        "n": jnp.zeros((), jnp.int32),
    }


def make_ema(skip_nonfinite: bool = True, **kw) -> ema_jax.NormalizedEma:
    hyper = dict(ema_alpha=1e-3, batch_size=64, max_epoch=2, update_period=4)
    return ema_jax.normalized_ema(**(hyper | kw), skip_nonfinite=skip_nonfinite)


def compiled_update(ema: ema_jax.NormalizedEma, params) -> tuple[jax.stages.Compiled, int]:
    state = ema.init(params)
    compiled = jax.jit(ema.update, donate_argnums=1).lower(params, state).compile()
    return compiled, sum(x.nbytes for x in jax.tree.leaves(state))


VARIANTS = {
    "guard": dict(skip_nonfinite=True),
    "no_guard": dict(skip_nonfinite=False),
    "warmup": dict(warmup_epochs=1, steps_per_epoch=10),
    "period_1": dict(update_period=1),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16_with_fp32_ema"])
def test_donated_update_aliases_every_ema_buffer(variant, dtype):
    kw = dict(VARIANTS[variant])
    if dtype == "bfloat16_with_fp32_ema":
        params, kw["ema_dtype"] = tree(dtype=jnp.bfloat16), jnp.float32
    else:
        params = tree()
    compiled, state_bytes = compiled_update(make_ema(**kw), params)
    memory = compiled.memory_analysis()
    assert memory.alias_size_in_bytes == state_bytes
    # Nothing else comes out: beyond the state, only the output tuple's pointer table.
    outputs = len(jax.tree.leaves(make_ema(**kw).init(params)))
    assert memory.output_size_in_bytes - state_bytes <= 8 * outputs


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_update_temporaries_do_not_grow_with_the_parameters(variant):
    ema = make_ema(**VARIANTS[variant])
    small, _ = compiled_update(ema, tree(scale=1))
    large, _ = compiled_update(ema, tree(scale=8))
    temp = small.memory_analysis().temp_size_in_bytes
    assert large.memory_analysis().temp_size_in_bytes == temp
    assert temp <= TEMP_BYTES_PER_LEAF * len(tree())


class WideBnNet(nn.Module):
    width: int

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        x = nn.Dense(self.width)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        x = nn.Dense(self.width)(nn.relu(x))
        return nn.Dense(3)(nn.relu(x))


def train_step(state, x, y):
    def loss_fn(params):
        out, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats},
            x,
            train=True,
            mutable=["batch_stats"],
        )
        return jnp.mean((out - y) ** 2), updates["batch_stats"]

    grads, stats = jax.grad(loss_fn, has_aux=True)(state.params)
    if isinstance(state, ema_jax.EmaTrainState):
        return state.apply_gradients(grads=grads, batch_stats=stats)
    return state.apply_gradients(grads=grads).replace(batch_stats=stats)


class PlainState(train_state.TrainState):
    batch_stats: dict | None = None


def train_step_memory(width: int, ema: ema_jax.NormalizedEma | None):
    model = WideBnNet(width)
    x, y = jnp.ones((8, 32)), jnp.zeros((8, 3))
    variables = model.init(jax.random.key(0), x)
    common = dict(
        apply_fn=model.apply,
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        tx=optax.sgd(0.1, momentum=0.9),
    )
    if ema is None:
        state = PlainState.create(**common).replace(step=jnp.zeros((), jnp.int32))
        ema_bytes, ema_leaves = 0, 0
    else:
        state = ema_jax.EmaTrainState.create(**common, ema=ema)
        ema_bytes = sum(x.nbytes for x in jax.tree.leaves(state.ema_state))
        ema_leaves = len(jax.tree.leaves(state.ema_state.ema))
    compiled = jax.jit(train_step, donate_argnums=0).lower(state, x, y).compile()
    return compiled.memory_analysis(), ema_bytes, ema_leaves


@pytest.mark.parametrize("period", [1, 32])
@pytest.mark.parametrize("skip_nonfinite", [True, False])
def test_train_step_ema_adds_its_state_and_no_parameter_sized_temporaries(period, skip_nonfinite):
    ema = make_ema(skip_nonfinite=skip_nonfinite, update_period=period)
    added = []
    for width in (256, 1024):  # the largest leaf grows 16x
        plain, _, _ = train_step_memory(width, None)
        with_ema, ema_bytes, ema_leaves = train_step_memory(width, ema)
        assert with_ema.alias_size_in_bytes - plain.alias_size_in_bytes == ema_bytes
        assert with_ema.argument_size_in_bytes - plain.argument_size_in_bytes == ema_bytes
        extra = with_ema.temp_size_in_bytes - plain.temp_size_in_bytes
        assert extra <= TEMP_BYTES_PER_LEAF * ema_leaves
        added.append(extra)
    assert added[0] == added[1]  # what the EMA adds does not depend on the weights' size


# ------------------------------------------------------------------ HLO structure


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_averaging_lives_inside_the_conditional(variant):
    compiled, _ = compiled_update(make_ema(**VARIANTS[variant]), tree())
    comps, entry = computations(compiled.as_text())
    # The entry computation passes parameter-sized buffers around and nothing more.
    outside = [
        (op, shape) for shape, op, _ in comps[entry] if is_big(shape) and op != "conditional"
    ]
    assert all(op in {"parameter", "get-tuple-element", "tuple", "bitcast"} for op, _ in outside)
    (cond,) = [rest for _, op, rest in comps[entry] if op == "conditional"]
    branches = called(cond, "branch_computations") or [
        *called(cond, "false_computation"),
        *called(cond, "true_computation"),
    ]
    assert len(branches) == 2
    work = [arithmetic(comps, b) for b in branches]
    skip, fold = sorted(work, key=len)
    assert skip == set()  # the non-updating branch touches no parameter-sized array
    assert {"multiply", "subtract"} <= fold

"""Several EMAs in one pass: each average is the single EMA of its schedule.

One state keeps K averages along a trailing axis of every EMA leaf; one update reads
the parameters once for all of them. Compared leaf for leaf with K separate
``ema(schedule)`` runs over the same trajectory.
"""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from support import run_ema
from support.models import PYCLS

import ema_jax
from ema_jax import nnx as ema_nnx
from ema_jax import schedules

from conftest import make_trajectory

LERP = {
    "pycls": schedules.pycls(**PYCLS),
    "debiased": schedules.constant(0.8, update_period=3, debias=True),
    "power": schedules.power_function(sigma_rel=0.05, batch_size=4, update_period=4),
    "warmup": schedules.warmup_power(update_after_step=5, update_period=2),
    "halflife": schedules.halflife(halflife_samples=40, batch_size=4, rampup_ratio=0.05),
    "fraction": schedules.fraction_of_training(halflife_fraction=0.1, total_steps=50),
}


@pytest.mark.parametrize("nonfinite", ["skip", "skip_and_count", "propagate"])
def test_each_average_is_its_single_ema_bit_for_bit(nonfinite):
    trajectory = make_trajectory(50)
    several = ema_jax.ema(LERP, nonfinite=nonfinite)
    state = run_ema(several, trajectory)
    for k, (name, schedule) in enumerate(LERP.items()):
        single = run_ema(ema_jax.ema(schedule, nonfinite=nonfinite), trajectory)
        for chosen in (several.average(state.ema, name), several.average(state.ema, k)):
            jax.tree.map(np.testing.assert_array_equal, chosen, single.ema)
    assert int(state.step) == 50


def test_constant_decays_alone_are_bit_identical_and_beside_lerps_within_an_ulp():
    trajectory = make_trajectory(50)
    constants = {"a": schedules.constant(0.9), "b": schedules.constant(0.99, update_period=2)}
    singles = {n: run_ema(ema_jax.ema(s), trajectory).ema for n, s in constants.items()}
    alone = ema_jax.ema(constants)
    state = run_ema(alone, trajectory)
    for name in constants:
        jax.tree.map(np.testing.assert_array_equal, alone.average(state.ema, name), singles[name])
    # Beside lerp-form averages the select between the two forms changes XLA:CPU's fma
    # contraction of decay * ema + (1 - decay) * p: one ulp per update at most.
    mixed = ema_jax.ema({**constants, **LERP})
    state = run_ema(mixed, trajectory)
    peak = max(float(np.max(np.abs(p["w"]))) for p in trajectory)
    bound = 50 * float(np.finfo(np.float32).eps) * peak
    for name in constants:
        for a, b in zip(
            jax.tree.leaves(mixed.average(state.ema, name)),
            jax.tree.leaves(singles[name]),
            strict=True,
        ):
            np.testing.assert_allclose(a, b, rtol=0, atol=bound)


def test_the_update_writes_every_average_in_place_and_adds_no_parameter_sized_temporary():
    ema = ema_jax.ema(tuple(LERP.values()))

    def compiled(scale):
        params = {"w": jnp.ones((64, 128 * scale)), "n": jnp.zeros((), jnp.int32)}
        state = ema.init(params)
        lowered = jax.jit(ema.update, donate_argnums=1).lower(params, state)
        return lowered.compile().memory_analysis(), sum(x.nbytes for x in jax.tree.leaves(state))

    (small, small_bytes), (large, large_bytes) = compiled(1), compiled(8)
    assert small.alias_size_in_bytes == small_bytes and large.alias_size_in_bytes == large_bytes
    assert large.temp_size_in_bytes == small.temp_size_in_bytes


def test_averages_have_a_trailing_axis_and_settings_name_them():
    assert ema_jax.ema((schedules.constant(0.9), schedules.constant(0.99))).alpha is None
    ema = ema_jax.ema({"fast": schedules.constant(0.9), "slow": schedules.constant(0.999)})
    state = ema.init({"w": jnp.ones((3, 2)), "n": jnp.zeros((), jnp.int32)})
    assert state.ema["w"].shape == (3, 2, 2) and state.ema["n"].shape == (2,)
    assert ema.several and ema.names == ("fast", "slow")
    assert list(ema.settings()["schedule"]) == ["fast", "slow"]
    assert [r.schedule for r in ema.explain()] == ["constant", "constant"]


class Mlp(nn.Module):
    @nn.compact
    def __call__(self, x, train=True):
        return nn.Dense(3)(nn.relu(nn.Dense(8)(x)))


def test_train_state_evaluates_one_average_by_name():
    model = Mlp()
    params = model.init(jax.random.key(0), jnp.ones((4, 5)))["params"]
    ema = ema_jax.ema({"fast": schedules.constant(0.5), "slow": schedules.constant(0.9)})
    state = ema_jax.EmaTrainState.create(
        apply_fn=model.apply, params=params, tx=optax.sgd(0.1), ema=ema
    )
    grads = jax.tree.map(jnp.ones_like, params)
    params = jax.tree.map(np.array, params)  # the state's buffers are donated below
    state = jax.jit(lambda s: s.apply_gradients(grads=grads), donate_argnums=0)(state)
    fast, slow = state.ema_variables("fast"), state.ema_variables(1)
    for p, f, s, new in zip(
        jax.tree.leaves(params),
        jax.tree.leaves(fast["params"]),
        jax.tree.leaves(slow["params"]),
        jax.tree.leaves(state.params),
        strict=True,
    ):
        np.testing.assert_allclose(f, 0.5 * p + 0.5 * new, rtol=1e-6)
        np.testing.assert_allclose(s, 0.9 * p + 0.1 * new, rtol=1e-6)
    model.apply(fast, jnp.ones((4, 5)))


def test_nnx_ema_evaluates_one_average():
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    transform = ema_jax.ema({"fast": schedules.constant(0.5), "slow": schedules.constant(0.9)})
    ema = ema_nnx.Ema(model, transform, only=nnx.Param)
    before = jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(model, nnx.Param)))

    @nnx.jit
    def step(model, ema):
        model.kernel[...] = model.kernel[...] + 1.0
        ema.update(model)

    step(model, ema)
    view = ema.apply_to(model, which="slow")
    np.testing.assert_allclose(view.kernel[...], before["kernel"] + 0.1, rtol=1e-6)
    np.testing.assert_allclose(ema.apply_to(model, which=0).kernel[...], before["kernel"] + 0.5)


BAD = [
    (
        lambda e, s: e.average(s.ema),
        ValueError,
        "this EMA keeps 2 averages: pick one with which=(an index or one of ('fast', 'slow'))",
    ),
    (
        lambda e, s: e.average(s.ema, "medium"),
        ValueError,
        "which must be one of the names ('fast', 'slow'), got 'medium'",
    ),
    (
        lambda e, s: e.average(s.ema, 2),
        ValueError,
        "which must be an index below 2 or a name, got 2",
    ),
    (lambda e, s: ema_jax.ema(()), ValueError, "schedule must hold at least one schedule"),
    (
        lambda e, s: ema_jax.Ema((schedules.constant(0.9),), names=("a", "b")),
        ValueError,
        "names must be distinct, one per schedule, got ('a', 'b') for 1 schedule(s)",
    ),
    (
        lambda e, s: e.update({"w": jnp.ones(3)}, s),
        ValueError,
        "w has shape (3,) in params but (2,) in the EMA",
    ),
]


@pytest.mark.bad_input
@pytest.mark.parametrize(("call", "error", "message"), BAD, ids=[m[:40] for *_, m in BAD])
def test_bad_use_of_several_averages_is_named(call, error, message):
    ema = ema_jax.ema({"fast": schedules.constant(0.9), "slow": schedules.constant(0.99)})
    state = ema.init({"w": jnp.ones(2)})
    with pytest.raises(error, match=re.escape(message)):
        call(ema, state)

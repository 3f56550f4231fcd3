"""`normalized_ema` against pycls's literal NumPy loop, closed forms and properties."""

from __future__ import annotations

import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from support import assert_trees_close
from support import fp32_tolerance
from support import pycls_reference
from support import run_ema

import ema_jax

from conftest import make_trajectory

EPS32 = float(np.finfo(np.float32).eps)


@pytest.mark.parametrize(
    ("ema_alpha", "batch_size", "max_epoch", "update_period", "expected"),
    [
        (1e-5, 128, 200, 32, 1e-5 * (128 / 200 * 32)),  # pycls defaults
        (2.5e-4, 1024, 50, 32, 2.5e-4 * (1024 / 50 * 32)),  # pycls CIFAR best: 0.16384
        (1.0, 128, 1, 32, 1.0),  # clamped
        (0.0, 128, 200, 32, 0.0),
        (1e-5, 128, 200, 0, 0.0),  # EMA off
    ],
)
def test_linear_alpha_is_pycls_formula(ema_alpha, batch_size, max_epoch, update_period, expected):
    ema = ema_jax.normalized_ema(
        ema_alpha=ema_alpha,
        batch_size=batch_size,
        max_epoch=max_epoch,
        update_period=update_period,
    )
    assert ema.alpha == min(1.0, expected)  # bit-identical: same operations, same order


@pytest.mark.parametrize(
    ("ema_alpha", "batch_size", "max_epoch", "update_period"),
    [(2.5e-4, 1024, 50, 32), (1e-5, 128, 200, 32), (0.3, 4, 2, 1), (1e-9, 256, 100, 8)],
)
def test_exact_alpha_is_closed_form(ema_alpha, batch_size, max_epoch, update_period):
    ema = ema_jax.normalized_ema(
        ema_alpha=ema_alpha,
        batch_size=batch_size,
        max_epoch=max_epoch,
        update_period=update_period,
        rule="exact",
    )
    closed = 1 - (1 - ema_alpha / max_epoch) ** (batch_size * update_period)
    # The naive power loses digits to cancellation when alpha is tiny: compare
    # against it with its own error bound, ~eps64 / alpha relative.
    assert ema.alpha == pytest.approx(closed, rel=max(1e-12, 1e-15 / closed))


def test_exact_alpha_of_pycls_cifar_recipe():
    # mission.md: linear 0.16384 vs exact 0.15112 for 2.5e-4, batch 1024, period 32, 50 epochs.
    ema = ema_jax.normalized_ema(
        ema_alpha=2.5e-4, batch_size=1024, max_epoch=50, update_period=32, rule="exact"
    )
    assert round(ema.alpha, 5) == 0.15112


def test_exact_alpha_is_one_when_rate_reaches_one():
    ema = ema_jax.normalized_ema(ema_alpha=3.0, batch_size=1, max_epoch=2, rule="exact")
    assert ema.alpha == 1.0


REFERENCE_CASES = {
    # name: (hyperparameters, steps_per_epoch, steps)
    "period_divides_epoch": (
        dict(ema_alpha=1e-3, batch_size=64, max_epoch=4, update_period=2),
        8,
        32,
    ),
    "period_not_dividing_epoch": (
        dict(ema_alpha=1e-3, batch_size=64, max_epoch=4, update_period=3),
        7,
        35,
    ),
    "warmup_then_average": (
        dict(ema_alpha=2e-3, batch_size=32, max_epoch=5, update_period=2, warmup_epochs=2),
        5,
        30,
    ),
    "period_longer_than_epoch": (
        dict(ema_alpha=1e-3, batch_size=64, max_epoch=4, update_period=10),
        4,
        24,
    ),
    "clamped_alpha": (dict(ema_alpha=1.0, batch_size=64, max_epoch=4, update_period=2), 5, 15),
    "every_step": (dict(ema_alpha=1e-3, batch_size=16, max_epoch=4, update_period=1), 6, 24),
    "off": (dict(ema_alpha=1e-3, batch_size=16, max_epoch=4, update_period=0), 6, 12),
}


# Every case under jit (how the update is used); without jit (eager dispatch, several
# seconds a case) the two that exercise warmup and an uneven period suffice.
REFERENCE_RUNS = [(case, True) for case in sorted(REFERENCE_CASES)] + [
    ("warmup_then_average", False),
    ("period_not_dividing_epoch", False),
]


@pytest.mark.parametrize("rule", ["linear", "exact"])
@pytest.mark.parametrize(("case", "jit"), REFERENCE_RUNS)
def test_matches_pycls_reference_loop(case, rule, jit):
    hyper, steps_per_epoch, steps = REFERENCE_CASES[case]
    trajectory = make_trajectory(steps, seed=len(case))
    ema = ema_jax.normalized_ema(**hyper, steps_per_epoch=steps_per_epoch, rule=rule)
    state = run_ema(ema, trajectory, jit=jit)
    full = dict(warmup_epochs=0) | hyper
    expected = pycls_reference.run(
        trajectory,
        steps_per_epoch=steps_per_epoch,
        alpha=None if rule == "linear" else ema.alpha,
        **full,
    )
    assert_trees_close(state.ema, expected, atol=fp32_tolerance(trajectory))
    assert int(state.step) == steps


def test_without_steps_per_epoch_the_cadence_runs_over_the_whole_run():
    trajectory = make_trajectory(20)
    ema = ema_jax.normalized_ema(ema_alpha=1e-3, batch_size=64, max_epoch=4, update_period=3)
    state = run_ema(ema, trajectory)
    # One endless epoch: updates at steps 0, 3, 6, ... of the run.
    expected = pycls_reference.run(
        trajectory,
        steps_per_epoch=len(trajectory),
        ema_alpha=1e-3,
        batch_size=64,
        max_epoch=4,
        update_period=3,
        warmup_epochs=0,
    )
    assert_trees_close(state.ema, expected, atol=fp32_tolerance(trajectory))


def test_cadence_restarts_every_epoch():
    # 7 steps per epoch, period 3: updates at in-epoch iterations 0, 3, 6, so at
    # global steps 0, 3, 6, 7, 10, 13, ... and the EMA changes exactly there.
    ema = ema_jax.normalized_ema(
        ema_alpha=1e-2, batch_size=10, max_epoch=1, update_period=3, steps_per_epoch=7
    )
    state = ema.init({"x": jnp.zeros(())})
    update = jax.jit(ema.update)
    changed = []
    for i in range(14):
        new = update({"x": jnp.asarray(float(i + 1))}, state)
        changed.append(bool(new.ema["x"] != state.ema["x"]))
        state = new
    assert [i for i, c in enumerate(changed) if c] == [0, 3, 6, 7, 10, 13]


def test_warmup_copies_weights_exactly():
    trajectory = make_trajectory(12)
    ema = ema_jax.normalized_ema(
        ema_alpha=1e-4,
        batch_size=32,
        max_epoch=10,
        update_period=1,
        warmup_epochs=2,
        steps_per_epoch=5,
    )
    state = run_ema(ema, trajectory[:11])  # 10 steps: all inside the two warmup epochs
    for name, value in trajectory[10].items():
        np.testing.assert_array_equal(np.asarray(state.ema[name]), value)
    state = jax.jit(ema.update)(jax.tree.map(jnp.asarray, trajectory[11]), state)
    assert not np.array_equal(np.asarray(state.ema["w"]), trajectory[11]["w"])


def test_alpha_one_is_a_copy():
    trajectory = make_trajectory(5)
    ema = ema_jax.normalized_ema(ema_alpha=10.0, batch_size=32, max_epoch=1, update_period=1)
    assert ema.alpha == 1.0
    state = run_ema(ema, trajectory)
    for name, value in trajectory[-1].items():
        np.testing.assert_array_equal(np.asarray(state.ema[name]), value)


def test_bf16_params_with_fp32_ema():
    trajectory = make_trajectory(16, dtype=jnp.bfloat16)
    ema = ema_jax.normalized_ema(
        ema_alpha=1e-3, batch_size=64, max_epoch=2, update_period=2, ema_dtype=jnp.float32
    )
    state = run_ema(ema, trajectory)
    assert state.ema["w"].dtype == jnp.float32
    assert state.ema["count"].dtype == jnp.int32
    as64 = [
        {k: np.asarray(v, np.float64) if k != "count" else v for k, v in p.items()}
        for p in trajectory
    ]
    expected = pycls_reference.run(
        as64,
        steps_per_epoch=len(trajectory),
        ema_alpha=1e-3,
        batch_size=64,
        max_epoch=2,
        update_period=2,
        warmup_epochs=0,
    )
    # The bf16 inputs are exact in fp32, so only fp32 rounding remains.
    assert_trees_close(state.ema, expected, atol=fp32_tolerance(as64))


def test_bf16_ema_is_rounded_once_per_update():
    ema = ema_jax.normalized_ema(ema_alpha=1e-3, batch_size=64, max_epoch=2, update_period=1)
    e0, p = jnp.asarray([1.0, 3.0], jnp.bfloat16), jnp.asarray([2.0, -1.0], jnp.bfloat16)
    state = jax.jit(ema.update)({"x": p}, ema.init({"x": e0}))
    assert state.ema["x"].dtype == jnp.bfloat16
    e64, p64 = np.asarray(e0, np.float64), np.asarray(p, np.float64)
    exact = e64 + ema.alpha * (p64 - e64)
    once = np.asarray(jnp.asarray(exact.astype(np.float32), jnp.bfloat16), np.float64)
    np.testing.assert_array_equal(np.asarray(state.ema["x"], np.float64), once)


def test_integer_leaves_are_copied_not_blended():
    ema = ema_jax.normalized_ema(ema_alpha=1e-3, batch_size=64, max_epoch=2, update_period=1)
    params = {"n": jnp.asarray(7, jnp.int32), "flag": jnp.asarray(True), "x": jnp.zeros(2)}
    state = ema.init(params)
    state = jax.jit(ema.update)(
        {"n": jnp.asarray(9, jnp.int32), "flag": jnp.asarray(False), "x": jnp.ones(2)}, state
    )
    assert int(state.ema["n"]) == 9 and state.ema["n"].dtype == jnp.int32
    assert bool(state.ema["flag"]) is False


def test_init_copies_params_so_donating_them_keeps_the_ema():
    ema = ema_jax.normalized_ema(ema_alpha=1e-3, batch_size=64, max_epoch=2)
    params = {"x": jnp.arange(4.0)}
    state = ema.init(params)
    jax.jit(lambda p: jax.tree.map(lambda x: x + 1, p), donate_argnums=0)(params)
    np.testing.assert_array_equal(np.asarray(state.ema["x"]), np.arange(4.0))


def test_donated_update_writes_the_ema_in_place():
    ema = ema_jax.normalized_ema(ema_alpha=1e-3, batch_size=64, max_epoch=2, update_period=4)
    params = {"w": jnp.ones((64, 64)), "b": jnp.ones(64), "n": jnp.zeros((), jnp.int32)}
    state = ema.init(params)
    update = jax.jit(ema.update, donate_argnums=1)
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
    compiled = update.lower(params, state).compile()
    assert compiled.memory_analysis().alias_size_in_bytes == state_bytes
    before = [x.unsafe_buffer_pointer() for x in jax.tree.leaves(state.ema)]
    old = state
    for _ in range(5):  # updating and skipping calls alike
        state = update(params, state)
    after = [x.unsafe_buffer_pointer() for x in jax.tree.leaves(state.ema)]
    assert before == after
    assert all(x.is_deleted() for x in jax.tree.leaves(old))


def test_one_compilation_serves_a_whole_run():
    traces = []
    ema = ema_jax.normalized_ema(
        ema_alpha=1e-3,
        batch_size=32,
        max_epoch=4,
        update_period=3,
        warmup_epochs=1,
        steps_per_epoch=5,
    )

    def update(params, state):
        traces.append(1)
        return ema.update(params, state)

    update = jax.jit(update, donate_argnums=1)
    trajectory = make_trajectory(20)  # crosses the warmup boundary and 3 epoch boundaries
    state = ema.init(jax.tree.map(jnp.asarray, trajectory[0]))
    for params in trajectory[1:]:
        state = update(jax.tree.map(jnp.asarray, params), state)
    assert len(traces) == 1
    assert update._cache_size() == 1


def test_frozen_dict_params_fit_a_dict_ema():
    ema = ema_jax.normalized_ema(ema_alpha=1e-3, batch_size=64, max_epoch=2, update_period=1)
    state = ema.init({"layer": {"w": jnp.zeros(2)}})
    state = ema.update(flax.core.freeze({"layer": {"w": jnp.ones(2)}}), state)
    assert isinstance(state.ema, dict)


def test_step_saturates_instead_of_wrapping():
    ema = ema_jax.normalized_ema(
        ema_alpha=1e-3, batch_size=64, max_epoch=2, update_period=4, steps_per_epoch=10
    )
    state = ema.init({"x": jnp.zeros(2)})._replace(step=jnp.asarray(2**31 - 2, jnp.int32))
    update = jax.jit(ema.update)
    for _ in range(3):
        state = update({"x": jnp.ones(2)}, state)
    assert int(state.step) == 2**31 - 1


def test_state_is_a_pytree_of_arrays_only():
    ema = ema_jax.normalized_ema(ema_alpha=1e-3, batch_size=64, max_epoch=2)
    state = ema.init({"x": jnp.zeros(2)})
    leaves = jax.tree.leaves(state)
    assert all(isinstance(x, jax.Array) for x in leaves)
    assert state.step.dtype == jnp.int32 and state.step.shape == ()
    assert hash(ema) == hash(ema_jax.normalized_ema(ema_alpha=1e-3, batch_size=64, max_epoch=2))


@pytest.mark.parametrize("nan_steps", [(0,), (3, 4), (7,)])
def test_nonfinite_params_never_enter_the_ema(nan_steps):
    ema = ema_jax.normalized_ema(ema_alpha=5e-2, batch_size=10, max_epoch=1, update_period=1)
    update = jax.jit(ema.update, donate_argnums=1)
    clean = make_trajectory(8)
    state = ema.init(jax.tree.map(jnp.asarray, clean[0]))
    reference = ema.init(jax.tree.map(jnp.asarray, clean[0]))
    for i, params in enumerate(clean[1:]):
        params = jax.tree.map(jnp.asarray, params)
        if i in nan_steps:
            poisoned = dict(params, w=params["w"].at[1, 2].set(jnp.nan).at[0, 0].set(jnp.inf))
            before = np.asarray(state.ema["w"])
            state = update(poisoned, state)
            after = np.asarray(state.ema["w"])
            # The bad entries kept their EMA value; the others moved as usual.
            assert after[1, 2] == before[1, 2] and after[0, 0] == before[0, 0]
            assert np.isfinite(after).all()
            assert after[2, 3] != before[2, 3]
        else:
            state = update(params, state)
            reference = ema.update(params, reference)
    assert int(state.nonfinite_updates) == len(nan_steps)


def test_without_the_guard_nan_propagates_like_pycls():
    ema = ema_jax.normalized_ema(
        ema_alpha=5e-2, batch_size=10, max_epoch=1, update_period=1, skip_nonfinite=False
    )
    state = ema.init({"x": jnp.zeros(2)})
    state = jax.jit(ema.update)({"x": jnp.asarray([jnp.nan, 1.0])}, state)
    assert np.isnan(np.asarray(state.ema["x"][0])) and int(state.nonfinite_updates) == 0


def test_rules_agree_to_first_order():
    for x in [1e-6, 1e-4, 1e-2]:
        linear = ema_jax.normalized_ema(ema_alpha=x, batch_size=1, max_epoch=1, update_period=1)
        exact = ema_jax.normalized_ema(
            ema_alpha=x, batch_size=1, max_epoch=1, update_period=1, rule="exact"
        )
        assert math.isclose(exact.alpha, linear.alpha, rel_tol=x)

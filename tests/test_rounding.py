"""Stochastic rounding of a low-precision EMA, and the warning for an EMA that cannot move.

The reference is the closed form of a constant target: from ``e0`` towards ``p`` at
decay ``d``, the exact EMA after ``n`` updates is ``p - (p - e0) * d**n``.
"""

from __future__ import annotations

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from support import assert_trees_equal

import ema_jax
from ema_jax import schedules
from ema_jax._transform import EmaState

DECAY, N, SIZE = 0.9999, 1000, 4096
EXACT = 2.0 - (2.0 - 1.0) * DECAY**N  # 1.0952: the EMA of 1.0 moving towards 2.0
# Each stochastic rounding adds independent zero-mean noise of at most half a unit in
# the last place (bf16 between 1 and 2: 2**-8); 1000 of them (the contraction 0.9999
# barely damps them) give an entry a standard deviation <= 2**-8 * sqrt(1000) = 0.12,
# and the mean of 4096 entries <= 0.12 / 64 = 0.0019, 0.18% of EXACT: 0.5% is 2.8 of them.
MEAN_TOLERANCE = 0.005


def run(ema: ema_jax.Ema, start: float, target: float, dtype, steps: int, state=None):
    """``steps`` jitted updates towards ``target`` from ``init`` (or from ``state``)."""
    params = {"w": jnp.full(SIZE, target, dtype), "b": jnp.full((8, 8), target, dtype)}
    if state is None:
        state = ema.init({"w": jnp.full(SIZE, start, dtype), "b": jnp.full((8, 8), start, dtype)})

    @jax.jit
    def loop(state):
        return jax.lax.fori_loop(0, steps, lambda _, s: ema.update(params, s), state)

    return loop(state)


def mean(x: jax.Array) -> float:
    return float(jnp.mean(x.astype(jnp.float32)))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_stochastic_rounding_keeps_a_low_precision_ema_unbiased(dtype):
    stochastic = ema_jax.ema(schedules.constant(DECAY), rounding="stochastic")
    state = run(stochastic, 1.0, 2.0, dtype, N)
    assert state.ema["w"].dtype == dtype
    assert abs(mean(state.ema["w"]) - EXACT) <= MEAN_TOLERANCE * EXACT
    nearest = ema_jax.ema(schedules.constant(DECAY))
    with pytest.warns(ema_jax.EmaPrecisionWarning):
        stalled = run(nearest, 1.0, 2.0, dtype, N)
    assert mean(stalled.ema["w"]) == 1.0  # round-to-nearest: not one update registered


def test_an_explicit_bf16_ema_of_fp32_parameters_rounds_stochastically():
    ema = ema_jax.ema(schedules.constant(DECAY), ema_dtype="bf16", rounding="stochastic")
    state = run(ema, 1.0, 2.0, jnp.float32, N)
    assert state.ema["w"].dtype == jnp.bfloat16
    assert abs(mean(state.ema["w"]) - EXACT) <= MEAN_TOLERANCE * EXACT


def test_two_runs_are_bit_identical_and_the_noise_is_not_shared_by_leaves():
    ema = ema_jax.ema(schedules.constant(0.999), rounding="stochastic")
    first = run(ema, 1.0, 2.0, jnp.bfloat16, 300)
    second = run(ema_jax.ema(schedules.constant(0.999), rounding="stochastic"), 1.0, 2.0,
                 jnp.bfloat16, 300)  # fmt: skip
    assert_trees_equal(first, second)
    # The same values in two leaves (and at two positions) round differently.
    w, b = np.asarray(first.ema["w"], np.float32), np.asarray(first.ema["b"], np.float32)
    assert len(np.unique(w)) > 1 and not np.array_equal(w[:64], b.ravel())


def test_a_resumed_run_rounds_as_the_uninterrupted_one():
    ema = ema_jax.ema(schedules.constant(DECAY), rounding="stochastic")
    straight = run(ema, 1.0, 2.0, jnp.bfloat16, N)
    half = jax.device_get(run(ema, 1.0, 2.0, jnp.bfloat16, N // 2))  # "saved" to the host
    restored = EmaState(*jax.tree.map(jnp.asarray, tuple(half)))
    resumed = run(ema, 1.0, 2.0, jnp.bfloat16, N - N // 2, state=restored)
    assert int(resumed.step) == N
    assert_trees_equal(resumed, straight)


def test_each_of_several_averages_is_what_its_schedule_alone_gives():
    fast, slow = schedules.constant(0.99), schedules.constant(DECAY)
    both = ema_jax.ema({"fast": fast, "slow": slow}, rounding="stochastic")
    state = run(both, 1.0, 2.0, jnp.bfloat16, 200)
    for name, schedule in (("fast", fast), ("slow", slow)):
        alone = run(ema_jax.ema(schedule, rounding="stochastic"), 1.0, 2.0, jnp.bfloat16, 200)
        assert_trees_equal(both.average(state.ema, name), alone.ema)


def test_the_guard_still_keeps_nan_entries_out():
    ema = ema_jax.ema(schedules.constant(0.99), rounding="stochastic", nonfinite="skip_and_count")
    state = ema.init({"w": jnp.ones(SIZE, jnp.bfloat16)})
    update = jax.jit(ema.update, donate_argnums=1)
    state = update({"w": jnp.full(SIZE, 2.0, jnp.bfloat16)}, state)
    before = np.asarray(state.ema["w"], np.float32)
    bad = jnp.full(SIZE, 2.0, jnp.bfloat16).at[::3].set(jnp.nan).at[1::3].set(jnp.inf)
    state = update({"w": bad}, state)
    after = np.asarray(state.ema["w"], np.float32)
    np.testing.assert_array_equal(after[::3], before[::3])
    np.testing.assert_array_equal(after[1::3], before[1::3])
    assert np.isfinite(after).all() and int(state.nonfinite_updates) == 1
    assert (after[2::3] >= before[2::3]).all() and (after[2::3] > before[2::3]).any()


def test_float32_leaves_round_to_nearest_and_the_state_has_nothing_more():
    trajectory = [
        {"f32": jnp.full(64, x, jnp.float32), "bf16": jnp.full(64, x, jnp.bfloat16)}
        for x in (1.0, 1.7, 1.3, 2.9)
    ]
    nearest, stochastic = (
        ema_jax.ema(schedules.constant(0.9), rounding=r) for r in ("nearest", "stochastic")
    )
    states = []
    for ema in (nearest, stochastic):
        state = ema.init(trajectory[0])
        for params in trajectory[1:]:
            state = jax.jit(ema.update)(params, state)
        states.append(state)
    np.testing.assert_array_equal(states[0].ema["f32"], states[1].ema["f32"])
    assert not np.array_equal(states[0].ema["bf16"], states[1].ema["bf16"])
    shapes = [jax.tree.map(lambda x: (x.shape, x.dtype), s) for s in states]
    assert shapes[0] == shapes[1]


def test_settings_record_the_rounding():
    assert ema_jax.ema(schedules.constant(0.9)).settings()["rounding"] == "nearest"
    ema = ema_jax.ema(schedules.constant(0.9), ema_dtype="bf16", rounding="stochastic")
    assert ema.settings()["rounding"] == "stochastic"


# ------------------------------------------------------------ an EMA that cannot move


def test_a_bf16_ema_at_decay_0_9999_warns_at_init_and_names_both_fixes():
    ema = ema_jax.ema(schedules.constant(DECAY))  # ema_dtype=None: the parameters' bf16
    with pytest.warns(ema_jax.EmaPrecisionWarning) as record:
        ema.init({"w": jnp.ones(4, jnp.bfloat16)})
    (message,) = [str(w.message) for w in record]
    assert "bfloat16" in message and "alpha=0.0001" in message
    assert "ema_dtype=jnp.float32" in message and "rounding='stochastic'" in message


@pytest.mark.parametrize(
    "ema",
    [
        ema_jax.ema(schedules.constant(DECAY), ema_dtype=jnp.float32),  # an fp32 EMA
        ema_jax.ema(schedules.constant(DECAY), rounding="stochastic"),  # moves on average
        ema_jax.ema(schedules.constant(0.99)),  # alpha 0.01 > bf16's eps / 2 = 0.0039
    ],
    ids=["fp32 ema", "stochastic", "decay 0.99"],
)
def test_no_warning_where_the_ema_moves(ema):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ema.init({"w": jnp.ones(4, jnp.bfloat16)})


def test_the_warning_reaches_nnx_and_explain_names_the_fix():
    nnx = pytest.importorskip("flax.nnx")
    from ema_jax.nnx import Ema

    model = nnx.Linear(2, 2, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    with pytest.warns(ema_jax.EmaPrecisionWarning):
        Ema(model, ema_jax.ema(schedules.constant(DECAY)))
    report = ema_jax.explain(schedules.constant(DECAY), dtype=jnp.bfloat16)
    assert any("rounding='stochastic'" in w for w in report.warnings)


# ------------------------------------------------------------------ bad input

BAD = [
    (dict(rounding="up"), "rounding must be one of ('nearest', 'stochastic'), got 'up'"),
    (dict(rounding=None), "rounding must be one of ('nearest', 'stochastic'), got None"),
    (
        dict(rounding="stochastic", ema_dtype=jnp.float32),
        "rounding='stochastic' rounds to an EMA narrower than float32, but ema_dtype='float32'",
    ),
]


@pytest.mark.bad_input
@pytest.mark.parametrize(("kwargs", "text"), BAD, ids=["unknown", "None", "fp32 ema"])
def test_bad_rounding_names_the_argument(kwargs, text):
    with pytest.raises(ValueError, match=re.escape(text)):
        ema_jax.ema(schedules.constant(0.9), **kwargs)

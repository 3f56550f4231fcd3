"""Issue 15's silent cases, each now either right or a named error.

The guard looks at the result, so an overflowing blend keeps the previous value; the
resolved step size is checked; an ``ema_alpha`` of 0 freezes; complex leaves are
averaged; a float step, a dtype that cannot hold the parameters and NaN at init are
refused before tracing.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ema_jax
from ema_jax import schedules

F32_MAX = float(np.finfo(np.float32).max)


@pytest.mark.parametrize("nonfinite", ["skip", "skip_and_count"])
def test_a_blend_that_overflows_keeps_the_previous_value(nonfinite):
    # Finite parameters -3e38 then 3.4e38: p - ema overflows to inf. Before: inf, then NaN forever.
    half = schedules.halflife(halflife_samples=1, batch_size=1)  # alpha 0.5, ema + a * (p - ema)
    ema = ema_jax.ema(half, nonfinite=nonfinite)
    update = jax.jit(ema.update)
    state = ema.init({"w": jnp.array([-3e38, 1.0], jnp.float32)})
    state = update({"w": jnp.array([3.4e38, 3.0], jnp.float32)}, state)
    np.testing.assert_array_equal(state.ema["w"], np.array([-3e38, 2.0], np.float32))
    state = update({"w": jnp.array([1.0, 3.0], jnp.float32)}, state)  # and it goes on averaging
    assert bool(jnp.isfinite(state.ema["w"]).all())
    assert float(state.ema["w"][0]) == pytest.approx(-1.5e38, rel=1e-6)
    # The count reads the parameters (finite here); see EmaState.nonfinite_updates.
    assert int(state.nonfinite_updates) == 0


def test_a_bfloat16_to_float16_blend_that_overflows_stays_finite():
    ema = ema_jax.ema(schedules.constant(0.5), ema_dtype=jnp.float16)
    state = ema.init({"w": jnp.array([6e4], jnp.float32)})
    state = jax.jit(ema.update)({"w": jnp.array([6e4], jnp.float32)}, state)  # 6e4 fits
    state = jax.jit(ema.update)({"w": jnp.array([1e5], jnp.float32)}, state)  # 8e4 does not
    assert float(state.ema["w"][0]) == pytest.approx(6e4, rel=1e-3)


def test_propagate_lets_the_overflow_in():
    half = schedules.halflife(halflife_samples=1, batch_size=1)
    ema = ema_jax.ema(half, nonfinite="propagate")
    state = ema.init({"w": jnp.array([-3e38], jnp.float32)})
    state = jax.jit(ema.update)({"w": jnp.array([3.4e38], jnp.float32)}, state)
    assert not bool(jnp.isfinite(state.ema["w"]).all())


@pytest.mark.parametrize(
    "hyper",
    [
        dict(ema_alpha=0, batch_size=1e308, max_epoch=1, rule="exact"),  # was alpha = nan
        dict(ema_alpha=0, batch_size=1e300, max_epoch=1e-10),  # was alpha = 1.0
    ],
)
def test_an_ema_alpha_of_zero_freezes_the_ema(hyper):
    ema = ema_jax.normalized_ema(**hyper, update_period=1)
    assert ema.alpha == 0.0
    state = ema.init({"w": jnp.zeros(3)})
    state = jax.jit(ema.update)({"w": jnp.ones(3)}, state)
    np.testing.assert_array_equal(state.ema["w"], np.zeros(3))
    assert ema.explain().warnings[0].startswith("EMA off: ema_alpha=0")


def test_every_schedule_step_size_is_in_zero_one():
    for s in (
        schedules.constant(0.0),
        schedules.constant(0.999999, debias=True),
        schedules.warmup_power(decay=0.9999999, inv_gamma=1e-9, power=10.0),
        schedules.tf_warmup(0.0),
        schedules.power_function(gamma=1e-9, batch_size=1e-9, update_period=7),
        schedules.halflife(halflife_samples=1e-300, batch_size=1e300, rampup_ratio=1e300),
        schedules.fraction_of_training(halflife_fraction=1e-12, total_steps=2**31 - 1),
    ):
        report = ema_jax.explain(s, total_steps=getattr(s, "total_steps", None) or 1000)
        alphas = [alpha for _, alpha, *_ in report.curve]
        assert all(0.0 <= a <= 1.0 for a in alphas), (s, alphas)


@pytest.mark.parametrize("dtype", [jnp.complex64])
def test_complex_leaves_are_averaged_not_copied(dtype):
    ema = ema_jax.ema(schedules.constant(0.75), ema_dtype=jnp.float32)
    state = ema.init({"z": jnp.zeros(2, dtype), "w": jnp.zeros(2, jnp.bfloat16)})
    state = jax.jit(ema.update)(
        {"z": jnp.full(2, 4 + 8j, dtype), "w": jnp.ones(2, jnp.bfloat16)}, state
    )
    np.testing.assert_allclose(state.ema["z"], np.full(2, 1 + 2j))
    assert state.ema["z"].dtype == dtype  # ema_dtype is for real floating leaves
    assert state.ema["w"].dtype == jnp.float32


def test_ema_dtype_takes_the_short_names_the_cli_takes():
    assert ema_jax.ema(schedules.constant(0.9), ema_dtype="bf16").ema_dtype == jnp.bfloat16
    assert (
        ema_jax.normalized_ema(
            ema_alpha=1e-3, batch_size=8, max_epoch=1, ema_dtype="fp32"
        ).ema_dtype
        == np.float32
    )


BAD = [
    (
        lambda: ema_jax.ema(schedules.constant(0.9), ema_dtype=jnp.float16).init(
            {"w": jnp.array([1e5, 1.0])}
        ),
        ValueError,
        "params['w'] has entries up to 1e+05, beyond the largest float16 (6.55e+04): they would"
        " be Inf in the EMA; pass an ema_dtype that holds them",
    ),
    (
        lambda: ema_jax.ema(schedules.constant(0.9)).init({"w": jnp.array([1.0, jnp.nan])}),
        ValueError,
        "params['w'] has 1 NaN/Inf entries at init: an EMA that starts non-finite stays so",
    ),
    (
        lambda: (
            lambda e: e.update(
                {"w": jnp.ones(2)},
                e.init({"w": jnp.ones(2)})._replace(step=jnp.zeros((), jnp.float32)),
            )
        )(ema_jax.ema(schedules.constant(0.9))),
        TypeError,
        "state.step must be an integer scalar (int32 from init), got shape () and dtype float32",
    ),
    (
        lambda: (
            lambda e: e.update(
                {"w": jnp.ones(2)},
                e.init({"w": jnp.ones(2)})._replace(step=jnp.zeros((2,), jnp.int32)),
            )
        )(ema_jax.ema(schedules.constant(0.9))),
        TypeError,
        "state.step must be an integer scalar (int32 from init), got shape (2,)",
    ),
]


@pytest.mark.bad_input
@pytest.mark.parametrize(("call", "error", "message"), BAD, ids=[m[:50] for *_, m in BAD])
def test_silent_cases_are_named_errors(call, error, message):
    with pytest.raises(error, match=re.escape(message)):
        call()


def test_nan_at_init_is_allowed_when_the_guard_is_off():
    ema = ema_jax.ema(schedules.constant(0.9), nonfinite="propagate")
    state = ema.init({"w": jnp.array([1.0, jnp.nan])})
    assert bool(jnp.isnan(state.ema["w"][1]))


def test_init_under_jit_checks_nothing_it_cannot_see():
    ema = ema_jax.ema(schedules.constant(0.9), ema_dtype=jnp.float16)
    state = jax.jit(ema.init)({"w": jnp.array([1.0, 2.0])})
    assert state.ema["w"].dtype == jnp.float16

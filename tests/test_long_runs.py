"""The step counter, cadence and warmup at the largest step counts an int32 can hold."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import ema_jax

INT32_MAX = 2**31 - 1


def updated_steps(ema: ema_jax.NormalizedEma, first: int, count: int) -> dict[int, str]:
    """Runs ``count`` calls from step ``first``; says at which steps the EMA blended or copied."""
    update = jax.jit(ema.update, donate_argnums=1)
    state = ema.init({"x": jnp.zeros(())})._replace(step=jnp.asarray(first, jnp.int32))
    seen = {}
    for n in range(count):
        before = float(state.ema["x"])
        target = float(n + 1) * 1000.0  # always far from the EMA, so a blend is visible
        state = update({"x": jnp.asarray(target)}, state)
        after = float(state.ema["x"])
        if after == target:
            seen[first + n] = "copy"
        elif after != before:
            seen[first + n] = "blend"
    assert int(state.step) == min(first + count, INT32_MAX)
    return seen


@pytest.mark.parametrize("steps_per_epoch", [1000, 390, 7])
def test_cadence_holds_up_to_the_last_int32_step(steps_per_epoch):
    ema = ema_jax.normalized_ema(
        ema_alpha=1e-4,
        batch_size=8,
        max_epoch=1,
        update_period=32,
        steps_per_epoch=steps_per_epoch,
    )
    first = INT32_MAX - 120
    seen = updated_steps(ema, first, 120)  # the last 120 steps before saturation
    expected = {i: "blend" for i in range(first, INT32_MAX) if (i % steps_per_epoch) % 32 == 0}
    assert seen == expected


def test_warmup_ends_on_time_at_huge_step_counts():
    spe = 1000
    warmup_epochs = 2_000_000  # warmup until step 2e9
    ema = ema_jax.normalized_ema(
        ema_alpha=1e-4,
        batch_size=8,
        max_epoch=1,
        update_period=4,
        warmup_epochs=warmup_epochs,
        steps_per_epoch=spe,
    )
    boundary = warmup_epochs * spe
    seen = updated_steps(ema, boundary - 8, 16)
    expected = {
        i: "copy" if i < boundary else "blend"
        for i in range(boundary - 8, boundary + 8)
        if (i % spe) % 4 == 0
    }
    assert seen == expected


@pytest.mark.parametrize("steps_per_epoch", [10, 1])
def test_past_saturation_every_call_acts_as_the_last_step_did(steps_per_epoch):
    ema = ema_jax.normalized_ema(
        ema_alpha=1e-4,
        batch_size=8,
        max_epoch=1,
        update_period=4,
        steps_per_epoch=steps_per_epoch,
    )
    last_updates = (INT32_MAX % steps_per_epoch) % 4 == 0  # no for 10 (7 % 4), yes for 1
    seen = updated_steps(ema, INT32_MAX - 4, 8)
    before = {i for i in seen if i < INT32_MAX}
    assert before == {i for i in range(INT32_MAX - 4, INT32_MAX) if (i % steps_per_epoch) % 4 == 0}
    after = {i for i in seen if i >= INT32_MAX}
    assert after == (set(range(INT32_MAX, INT32_MAX + 4)) if last_updates else set())

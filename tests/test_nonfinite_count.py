"""``count_nonfinite=False``: the NaN/Inf guard stays, the count (a reduction) goes."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ema_jax


def make(**kwargs):
    return ema_jax.normalized_ema(
        ema_alpha=5e-2, batch_size=10, max_epoch=1, update_period=1, **kwargs
    )


@pytest.mark.parametrize("count", [True, False])
def test_the_guard_holds_whether_or_not_updates_are_counted(count):
    ema = make(count_nonfinite=count)
    update = jax.jit(ema.update)
    state = ema.init({"x": jnp.zeros(3)})
    state = update({"x": jnp.asarray([jnp.nan, 1.0, jnp.inf])}, state)
    state = update({"x": jnp.asarray([1.0, 1.0, 1.0])}, state)
    a = np.float32(ema.alpha)
    # Entries 0 and 2 kept their EMA through the bad update and moved once; entry 1 twice.
    want = np.asarray([a, a + a * (1 - a), a], np.float32)
    np.testing.assert_allclose(np.asarray(state.ema["x"]), want, rtol=1e-6)
    assert int(state.nonfinite_updates) == (1 if count else 0)


def test_uncounted_update_reduces_nothing():
    params = {"x": jnp.zeros((4, 4))}
    for count, has_reduce in [(True, True), (False, False)]:
        ema = make(count_nonfinite=count)
        jaxpr = str(jax.make_jaxpr(ema.update)(params, ema.init(params)))
        # The count is a sum (see _has_nonfinite); nothing else reduces.
        assert bool(re.search(r"\breduce(_\w+)?\[", jaxpr)) == has_reduce, count


def test_count_nonfinite_must_be_a_bool():
    with pytest.raises(ValueError, match=re.escape("count_nonfinite must be a bool, got 'no'")):
        make(count_nonfinite="no")

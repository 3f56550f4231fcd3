"""The NaN/Inf guard's count sees every kind of non-finite entry, in every leaf.

The first call of a run always updates (step 0), whatever the period.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ema_jax

KINDS = {"nan": np.nan, "+inf": np.inf, "-inf": -np.inf}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
# From 4096 float32 entries on, XLA:CPU's jnp.max ignores NaN: both sides of that.
@pytest.mark.parametrize("size", [3, 4095, 4096, 10_000])
@pytest.mark.parametrize("kind", [*sorted(KINDS), "all -inf", None])
@pytest.mark.parametrize("period", [1, 32])
def test_count_sees_nan_and_both_infinities(dtype, size, kind, period):
    ema = ema_jax.normalized_ema(ema_alpha=1e-2, batch_size=10, max_epoch=1, update_period=period)
    other = {"w": jnp.ones((5,), dtype)}  # a clean leaf beside the poisoned one
    values = np.linspace(-3e3, 3e3, size).astype(np.float32)
    if kind == "all -inf":
        values[:] = -np.inf
    elif kind is not None:
        values[size // 2] = KINDS[kind]
    params = {"p": jnp.asarray(values, dtype), **other}
    state = ema.init(jax.tree.map(jnp.zeros_like, params))
    state = jax.jit(ema.update)(params, state)
    assert int(state.nonfinite_updates) == (kind is not None)
    assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(state.ema))


@pytest.mark.parametrize("period", [1, 32])
def test_largest_finite_values_are_not_counted(period):
    ema = ema_jax.normalized_ema(ema_alpha=1e-2, batch_size=10, max_epoch=1, update_period=period)
    for dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
        info = jnp.finfo(dtype)
        for size in (2, 5000):
            p = jnp.full((size,), info.max, dtype).at[0].set(info.min)
            state = jax.jit(ema.update)({"p": p}, ema.init({"p": jnp.zeros_like(p)}))
            assert int(state.nonfinite_updates) == 0

"""Property tests (hypothesis) of the transform's invariants."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import ema_jax

# One jitted update per hyperparameter setting is compiled, so keep examples few.
SETTINGS = settings(max_examples=25, deadline=None)


def sequences(width: int) -> st.SearchStrategy[list[list[float]]]:
    """2 to 8 float32 vectors of one width: the initial model, then one per step."""
    entry = st.floats(-1e3, 1e3, allow_nan=False, width=32)
    return st.lists(st.lists(entry, min_size=width, max_size=width), min_size=2, max_size=8)


# Tiny ema_alpha draws (1e-193) give an fp32 EMA that cannot move: init says so, rightly.
@pytest.mark.filterwarnings("ignore::ema_jax.EmaPrecisionWarning")
@SETTINGS
@given(seq=sequences(4), ema_alpha=st.floats(0.0, 2.0), update_period=st.integers(0, 3))
def test_ema_stays_within_the_range_of_what_it_averaged(seq, ema_alpha, update_period):
    ema = ema_jax.normalized_ema(
        ema_alpha=ema_alpha, batch_size=1, max_epoch=1, update_period=update_period
    )
    arrays = [jnp.asarray(v, jnp.float32) for v in seq]
    state = ema.init({"x": arrays[0]})
    for a in arrays[1:]:
        state = ema.update({"x": a}, state)
    stacked = np.stack([np.asarray(a) for a in arrays])
    out = np.asarray(state.ema["x"])
    # A convex combination rounded in fp32 can step one ulp outside the hull.
    slack = 2 * np.finfo(np.float32).eps * np.max(np.abs(stacked))
    assert np.all(out >= stacked.min(0) - slack) and np.all(out <= stacked.max(0) + slack)


@SETTINGS
@given(seq=sequences(3))
def test_alpha_one_is_a_copy(seq):
    ema = ema_jax.normalized_ema(ema_alpha=1.0, batch_size=64, max_epoch=1, update_period=1)
    state = ema.init({"x": jnp.asarray(seq[0], jnp.float32)})
    for v in seq[1:]:
        state = ema.update({"x": jnp.asarray(v, jnp.float32)}, state)
    np.testing.assert_array_equal(np.asarray(state.ema["x"]), np.asarray(seq[-1], np.float32))


@settings(max_examples=200, deadline=None)
@given(
    ema_alpha=st.floats(1e-9, 1e-2),
    batch_size=st.integers(1, 4096),
    max_epoch=st.integers(1, 1000),
    update_period=st.integers(1, 256),
)
def test_rules_agree_when_the_step_is_small(ema_alpha, batch_size, max_epoch, update_period):
    kw = dict(
        ema_alpha=ema_alpha, batch_size=batch_size, max_epoch=max_epoch, update_period=update_period
    )
    linear = ema_jax.normalized_ema(**kw).alpha
    exact = ema_jax.normalized_ema(**kw, rule="exact").alpha
    x = ema_alpha * batch_size * update_period / max_epoch
    if x < 0.1:
        # 1 - (1 - r)^N = N r (1 - (N - 1) r / 2 + ...): relative gap below x / 2 + x^2.
        assert abs(exact - linear) / linear <= x / 2 + x * x
    assert exact <= linear + 1e-15  # the linear rule overestimates (Bernoulli)

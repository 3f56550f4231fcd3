"""`EmaTrainState` under a jitted, donated train step, with and without BatchNorm."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from models import EMA
from models import BnNet
from models import Mlp
from models import batches
from models import make_state
from models import train_step

import ema_jax


@pytest.mark.parametrize("model", [Mlp(), BnNet()], ids=["plain", "batchnorm"])
def test_ema_matches_the_transform_fed_the_same_weights(model):
    traces = []

    def step(state, x, y):
        traces.append(1)
        return train_step(state, x, y)

    step = jax.jit(step, donate_argnums=0)
    state = make_state(model, EMA)
    variables = {"params": state.params}
    if state.batch_stats is not None:
        variables["batch_stats"] = state.batch_stats
    reference = EMA.init(variables)
    for x, y in batches(10):  # crosses the warmup boundary and several epochs
        state, _ = step(state, x, y)
        variables = {"params": state.params}
        if state.batch_stats is not None:
            variables["batch_stats"] = state.batch_stats
        reference = EMA.update(variables, reference)
    assert len(traces) == 1 and step._cache_size() == 1  # one compilation for the run
    assert int(state.step) == int(state.ema_state.step) == 10
    # Same operations on the same inputs: bit-identical.
    for got, want in zip(
        jax.tree.leaves(state.ema_state.ema), jax.tree.leaves(reference.ema), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert jax.tree.structure(state.ema_params) == jax.tree.structure(state.params)


def test_ema_batch_stats_evaluate_the_ema_model():
    state = make_state(BnNet(), EMA)
    step = jax.jit(train_step, donate_argnums=0)
    for x, y in batches(8):
        state, _ = step(state, x, y)
    assert state.ema_batch_stats is not None
    raw_mean = state.batch_stats["BatchNorm_0"]["mean"]
    ema_mean = state.ema_batch_stats["BatchNorm_0"]["mean"]
    assert not np.allclose(raw_mean, ema_mean)  # averaged, not a copy of the raw stats
    x = jnp.ones((2, 5))
    out = state.apply_fn(
        {"params": state.ema_params, "batch_stats": state.ema_batch_stats}, x, train=False
    )
    np.testing.assert_array_equal(out, state.apply_fn(state.ema_variables(), x, train=False))


def test_without_batch_stats_there_is_no_ema_of_them():
    state = make_state(Mlp(), EMA)
    assert state.batch_stats is None and state.ema_batch_stats is None
    assert set(state.ema_variables()) == {"params"}


def test_donated_train_step_updates_the_ema_in_place():
    state = make_state(BnNet(), EMA)
    step = jax.jit(train_step, donate_argnums=0)
    x, y = batches(1)[0]
    state, _ = step(state, x, y)
    before = [a.unsafe_buffer_pointer() for a in jax.tree.leaves(state.ema_state)]
    compiled = step.lower(state, x, y).compile()
    ema_bytes = sum(a.nbytes for a in jax.tree.leaves(state.ema_state))
    assert compiled.memory_analysis().alias_size_in_bytes >= ema_bytes
    state, _ = step(state, x, y)
    assert before == [a.unsafe_buffer_pointer() for a in jax.tree.leaves(state.ema_state)]


def test_create_refuses_something_that_is_not_an_ema():
    with pytest.raises(TypeError, match=re.escape("ema must be a transform")):
        ema_jax.EmaTrainState.create(apply_fn=None, params={}, tx=None, ema=0.999)


@pytest.mark.parametrize(
    ("model", "passed", "text"),
    [
        (BnNet(), None, "the state has batch_stats"),
        (Mlp(), {"m": jnp.zeros(2)}, "the state has no batch_stats"),
    ],
)
def test_apply_gradients_checks_batch_stats(model, passed, text):
    state = make_state(model, EMA)
    grads = jax.tree.map(jnp.zeros_like, state.params)
    with pytest.raises(ValueError, match=re.escape(text)):
        state.apply_gradients(grads=grads, batch_stats=passed)

"""`EmaTrainState` under a jitted, donated train step, with and without BatchNorm."""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from support import linear_gradient_error
from support import max_abs
from support import max_abs_diff
from support.models import EMA
from support.models import BnNet
from support.models import Mlp
from support.models import batches
from support.models import make_state
from support.models import train_step

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


# Gradient accumulation: k micro-batches of n/k under optax.MultiSteps against one
# batch of n per step, on a linear model, whose float error can be bounded in closed form.
K, N, STEPS, LR = 4, 8, 8, 0.1
U = 2.0**-24  # float32 unit roundoff
# Warmup of one 3-step epoch, then an update every 2 optimizer steps (alpha 0.4): the
# 8 steps cross the warmup boundary and several period and epoch boundaries.
ACC_EMA = ema_jax.normalized_ema(
    ema_alpha=0.05, batch_size=N, max_epoch=2, update_period=2, warmup_epochs=1, steps_per_epoch=3
)


def linear_state(tx: optax.GradientTransformation) -> ema_jax.EmaTrainState:
    model = nn.Dense(3)
    params = model.init(jax.random.key(0), jnp.ones((1, 5)))["params"]
    return ema_jax.EmaTrainState.create(apply_fn=model.apply, params=params, tx=tx, ema=ACC_EMA)


def accumulation_data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(STEPS, N, 5)).astype(np.float32)
    y = rng.normal(size=(STEPS, N, 3)).astype(np.float32)
    return x, y


def gradient_error(x: np.ndarray, y: np.ndarray, params: dict) -> float:
    return linear_gradient_error(x, y, params["kernel"], params["bias"])


def test_gradient_accumulation_updates_the_ema_per_optimizer_step():
    x, y = accumulation_data()
    step = jax.jit(train_step)
    ref = linear_state(optax.sgd(LR))  # one batch of N per optimizer step
    acc = linear_state(optax.MultiSteps(optax.sgd(LR), every_k_schedule=K))
    per_micro = ACC_EMA.init(acc.params)  # what an EMA updated on every call would do
    micro = [slice(j * N // K, (j + 1) * N // K) for j in range(K)]
    bound = ema_rounding = 0.0
    for t in range(STEPS):
        before = jax.tree.map(np.asarray, ref.params)
        ref, _ = step(ref, x[t], y[t])
        for j in range(K):
            ema_before = acc.ema_state
            acc, _ = step(acc, x[t, micro[j]], y[t, micro[j]])
            per_micro = ACC_EMA.update(acc.params, per_micro)
            if j < K - 1:  # accumulating: the weights and the EMA stand still
                jax.tree.map(np.testing.assert_array_equal, acc.ema_state, ema_before)
        assert int(acc.ema_state.step) == int(ref.ema_state.step) == t + 1
        assert int(acc.step) == K * (t + 1)
        # The bound on |params_acc - params_ref| after step t: the previous one grown
        # through the gradient's dependence on the weights (the Hessian 2/(3N) X~^T X~,
        # as a max-row-sum norm), plus both gradients' rounding (the full batch's; the
        # worst micro-batch's, and MultiSteps' running mean of K of them, 3 roundings
        # each) and both SGD updates' rounding.
        xt = np.concatenate([x[t], np.ones((N, 1), np.float32)], axis=1).astype(np.float64)
        hessian = float(np.abs(2 / (3 * N) * xt.T @ xt).sum(1).max())
        g_max = max_abs_diff(ref.params, before) / LR
        grad_err = (
            gradient_error(x[t], y[t], before)
            + max(gradient_error(x[t, m], y[t, m], before) for m in micro)
            + 3 * K * U * g_max
        )
        bound = (
            (1 + LR * hessian) * bound + LR * grad_err + 2 * U * (max_abs(ref.params) + LR * g_max)
        )
        assert max_abs_diff(acc.params, ref.params) <= bound, t
        # The EMA is a convex combination of the weights (a copy during warmup), so it
        # is off by at most the weights' worst error, plus 4 roundings per update.
        ema_rounding += 4 * U * max_abs(ref.ema_params)
        diff = max_abs_diff(acc.ema_params, ref.ema_params)
        assert diff <= bound + ema_rounding, (t, diff, bound + ema_rounding)
    # An EMA updated on every micro-batch is far outside the bound: the test tells
    # the two apart.
    assert max_abs_diff(per_micro.ema, ref.ema_params) > 100 * (bound + ema_rounding)


def test_a_rejected_micro_batch_does_not_count():
    tx = optax.MultiSteps(
        optax.sgd(LR), every_k_schedule=2, should_skip_update_fn=optax.skip_not_finite
    )
    state = linear_state(tx)
    apply = jax.jit(lambda s, g: s.apply_gradients(grads=g))
    ones = jax.tree.map(jnp.ones_like, state.params)
    nan = jax.tree.map(lambda p: jnp.full_like(p, jnp.nan), state.params)
    state = apply(state, nan)  # rejected at mini_step 0: MultiSteps' state is unchanged
    assert int(state.ema_state.step) == 0 and int(state.step) == 1
    state = apply(state, ones)
    assert int(state.ema_state.step) == 0
    state = apply(state, ones)
    assert int(state.ema_state.step) == 1 and int(state.step) == 3


def test_accumulating_train_step_needs_no_host_sync():
    state = linear_state(optax.MultiSteps(optax.sgd(LR), every_k_schedule=K))
    x, y = accumulation_data()
    jaxpr = str(jax.make_jaxpr(train_step)(state, x[0], y[0]))
    assert "cond" in jaxpr and "callback" not in jaxpr
    hlo = jax.jit(train_step).lower(state, x[0], y[0]).as_text()
    assert "callback" not in hlo and "outfeed" not in hlo


@pytest.mark.bad_input
def test_two_accumulating_optimizers_are_refused():
    multi = optax.MultiSteps(optax.sgd(LR), every_k_schedule=2).gradient_transformation()
    state = linear_state(optax.chain(multi, multi))
    grads = jax.tree.map(jnp.zeros_like, state.params)
    with pytest.raises(ValueError, match=re.escape("opt_state holds 2 optax.MultiStepsState")):
        state.apply_gradients(grads=grads)

"""`ema_jax.nnx.Ema` under gradient accumulation (optax.MultiSteps): per optimizer step.

k micro-batches of n/k against one batch of n per step on a linear model, whose
float error is bounded in closed form; rejected micro-batches; the explicit
``applied=``; no host sync, in-place writes, one compilation; the shared detection
rules against linen's.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from support import U32
from support import linear_gradient_error
from support import max_abs
from support import max_abs_diff

import ema_jax
from ema_jax import _accumulation
from ema_jax.linen._train_state import _optimizer_applied
from ema_jax.nnx import Ema

K, N, STEPS, LR = 4, 8, 8, 0.1
# Warmup of one 3-step epoch, then an update every 2 optimizer steps (alpha 0.4): the
# 8 steps cross the warmup boundary and several period and epoch boundaries.
ACC_EMA = ema_jax.normalized_ema(
    ema_alpha=0.05, batch_size=N, max_epoch=2, update_period=2, warmup_epochs=1, steps_per_epoch=3
)


def host(tree: Any) -> Any:
    """A NumPy copy of plain arrays, safe from donation."""
    return jax.tree.map(np.array, jax.device_get(nnx.as_pure(tree)))


def linear(tx: optax.GradientTransformation, width: int = 3) -> tuple[Any, Any, Ema]:
    model = nnx.Linear(5, width, rngs=nnx.Rngs(0))
    return model, nnx.Optimizer(model, tx, wrt=nnx.Param), Ema(model, ACC_EMA)


def train_step(model: Any, optimizer: Any, ema: Ema, x: jax.Array, y: jax.Array) -> None:
    grads = nnx.grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
    optimizer.update(model, grads)
    ema.update(model, optimizer=optimizer)  # after the optimizer, as always


def apply_grads(model: Any, optimizer: Any, ema: Ema, grads: Any) -> None:
    optimizer.update(model, grads)
    ema.update(model, optimizer=optimizer)


def accumulation_data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(STEPS, N, 5)).astype(np.float32)
    y = rng.normal(size=(STEPS, N, 3)).astype(np.float32)
    return x, y


def test_k_micro_batches_give_the_ema_of_one_batch_per_optimizer_step():
    x, y = accumulation_data()
    step = nnx.jit(train_step, donate_argnums=(0, 1, 2))
    ref = linear(optax.sgd(LR))  # one batch of N per optimizer step
    acc = linear(optax.MultiSteps(optax.sgd(LR), every_k_schedule=K))
    per_micro = ACC_EMA.init(host(nnx.state(acc[0])))  # an EMA updated on every call
    micro = [slice(j * N // K, (j + 1) * N // K) for j in range(K)]
    bound = ema_rounding = 0.0
    for t in range(STEPS):
        before = host(nnx.state(ref[0]))
        step(*ref, x[t], y[t])
        for j in range(K):
            ema_before = host(nnx.state(acc[2]))
            step(*acc, x[t, micro[j]], y[t, micro[j]])
            per_micro = ACC_EMA.update(host(nnx.state(acc[0])), per_micro)
            if j < K - 1:  # accumulating: the weights and the EMA, step included, stand still
                jax.tree.map(np.testing.assert_array_equal, host(nnx.state(acc[2])), ema_before)
        assert int(acc[2].ema_state.step) == int(ref[2].ema_state.step) == t + 1
        assert int(acc[1].step[...]) == K * (t + 1)  # nnx.Optimizer counts calls
        params_ref, params_acc = host(nnx.state(ref[0])), host(nnx.state(acc[0]))
        # The bound on |params_acc - params_ref| after step t: the previous one grown
        # through the gradient's dependence on the weights (the Hessian 2/(3N) X~^T X~,
        # as a max-row-sum norm), plus both gradients' rounding (the full batch's; the
        # worst micro-batch's, and MultiSteps' running mean of K of them, 3 roundings
        # each) and both SGD updates' rounding.
        xt = np.concatenate([x[t], np.ones((N, 1), np.float32)], axis=1).astype(np.float64)
        hessian = float(np.abs(2 / (3 * N) * xt.T @ xt).sum(1).max())
        g_max = max_abs_diff(params_ref, before) / LR
        kernel, bias = before["kernel"], before["bias"]
        grad_err = (
            linear_gradient_error(x[t], y[t], kernel, bias)
            + max(linear_gradient_error(x[t, m], y[t, m], kernel, bias) for m in micro)
            + 3 * K * U32 * g_max
        )
        sgd_rounding = 2 * U32 * (max_abs(params_ref) + LR * g_max)
        bound = (1 + LR * hessian) * bound + LR * grad_err + sgd_rounding
        assert max_abs_diff(params_acc, params_ref) <= bound, t
        # The EMA is a convex combination of the weights (a copy during warmup), so it
        # is off by at most the weights' worst error, plus 4 roundings per update.
        ema_ref, ema_acc = host(ref[2].params), host(acc[2].params)
        ema_rounding += 4 * U32 * max_abs(ema_ref)
        diff = max_abs_diff(ema_acc, ema_ref)
        assert diff <= bound + ema_rounding, (t, diff, bound + ema_rounding)
    # An EMA updated on every micro-batch is far outside the bound: the test tells
    # the two apart.
    assert max_abs_diff(per_micro.ema, host(ref[2].params)) > 100 * (bound + ema_rounding)


def test_a_rejected_micro_batch_does_not_count():
    tx = optax.MultiSteps(
        optax.sgd(LR), every_k_schedule=2, should_skip_update_fn=optax.skip_not_finite
    )
    model, optimizer, ema = linear(tx)
    apply = nnx.jit(apply_grads, donate_argnums=(0, 1, 2))
    ones = jax.tree.map(jnp.ones_like, nnx.state(model, nnx.Param))
    nan = jax.tree.map(lambda p: jnp.full_like(p, jnp.nan), ones)
    steps = []
    for grads in (nan, ones, ones, nan, ones, ones):
        apply(model, optimizer, ema, grads)
        steps.append(int(ema.ema_state.step))
    # Each NaN mini-step is rejected at mini_step 0 (MultiSteps' state unchanged); the
    # second one right after an applied step, where optax's has_updated says True.
    assert steps == [0, 0, 1, 1, 1, 2]
    assert bool(tx.has_updated(nnx.as_pure(optimizer.opt_state)))
    assert int(ema.nonfinite_updates[...]) == 0  # no NaN weights ever reached the EMA


@pytest.mark.parametrize("applied", [True, False])
def test_applied_as_a_python_bool(applied):
    model, optimizer, ema = linear(optax.sgd(LR))
    x, y = accumulation_data()
    grads = nnx.grad(lambda m: jnp.mean((m(x[0]) - y[0]) ** 2))(model)
    optimizer.update(model, grads)
    want = ACC_EMA.update(host(nnx.state(model)), ema.ema_state) if applied else ema.ema_state
    want = host(want)
    ema.update(model, applied=applied)
    jax.tree.map(np.testing.assert_array_equal, host(ema.ema_state), want)


def test_applied_as_a_traced_bool_under_jit():
    model, _, ema = linear(optax.sgd(LR))

    @nnx.jit(donate_argnums=1)
    def update(model, ema, flag):
        ema.update(model, applied=flag > 0)

    start = host(ema.ema_state)
    update(model, ema, jnp.int32(0))
    jax.tree.map(np.testing.assert_array_equal, host(ema.ema_state), start)
    update(model, ema, jnp.int32(1))
    want = host(ACC_EMA.update(host(nnx.state(model)), ACC_EMA.init(host(nnx.state(model)))))
    jax.tree.map(np.testing.assert_array_equal, host(ema.ema_state), want)


def test_an_optimizer_without_multi_steps_updates_every_call():
    model, optimizer, ema = linear(optax.adam(LR))
    step = nnx.jit(train_step, donate_argnums=(0, 1, 2))
    x, y = accumulation_data()
    for t in range(3):
        step(model, optimizer, ema, x[t], y[t])
    assert int(ema.ema_state.step) == 3


def plain_step(model: Any, optimizer: Any, ema: Ema, x: jax.Array, y: jax.Array) -> None:
    """The README's train step: ``ema.update(model)``, no optimizer at the call."""
    grads = nnx.grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
    optimizer.update(model, grads)
    ema.update(model)


def test_an_ema_given_the_optimizer_once_counts_optimizer_steps_on_a_plain_update():
    """The issue's case: 10 calls at k=4 are 2 optimizer steps, so EMA step 2, not 10."""
    model = nnx.Linear(5, 3, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.MultiSteps(optax.sgd(LR), K), wrt=nnx.Param)
    ema = Ema(model, ACC_EMA, optimizer=optimizer)
    per_call = Ema(model, ACC_EMA, optimizer=optimizer)  # to compare with optimizer= below
    step = nnx.jit(plain_step, donate_argnums=(0, 1, 2))

    @nnx.jit(donate_argnums=(0, 1))
    def explicit(model, ema, optimizer):
        ema.update(model, optimizer=optimizer)

    x, y = accumulation_data()
    for t in range(10):
        step(model, optimizer, ema, x[t % STEPS], y[t % STEPS])
        explicit(model, per_call, optimizer)
    assert int(optimizer.step[...]) == 10 and int(ema.ema_state.step) == 10 // K
    jax.tree.map(np.testing.assert_array_equal, host(ema.ema_state), host(per_call.ema_state))


def test_a_plain_update_skips_a_rejected_micro_batch_and_applied_still_wins():
    tx = optax.MultiSteps(
        optax.sgd(LR), every_k_schedule=2, should_skip_update_fn=optax.skip_not_finite
    )
    model = nnx.Linear(5, 3, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    ema = Ema(model, ACC_EMA, optimizer=optimizer)

    @nnx.jit(donate_argnums=(0, 1, 2))
    def apply(model, optimizer, ema, grads):
        optimizer.update(model, grads)
        ema.update(model)

    ones = jax.tree.map(jnp.ones_like, nnx.state(model, nnx.Param))
    nan = jax.tree.map(lambda p: jnp.full_like(p, jnp.nan), ones)
    steps = []
    for grads in (nan, ones, ones, nan, ones, ones):
        apply(model, optimizer, ema, grads)
        steps.append(int(ema.ema_state.step))
    assert steps == [0, 0, 1, 1, 1, 2]  # as with update(model, optimizer=optimizer)
    ema.update(model, applied=True)  # an explicit flag overrides the counters (mini_step 0)
    assert int(ema.ema_state.step) == 3


def test_given_an_optimizer_without_multi_steps_every_plain_update_counts():
    model = nnx.Linear(5, 3, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(LR), wrt=nnx.Param)
    ema = Ema(model, ACC_EMA, optimizer=optimizer)
    assert ema.accumulation is None
    step = nnx.jit(plain_step, donate_argnums=(0, 1, 2))
    x, y = accumulation_data()
    for t in range(3):
        step(model, optimizer, ema, x[t], y[t])
    assert int(ema.ema_state.step) == 3


def pure_step(model: Any, optimizer: Any, ema: Ema) -> tuple[Any, Any]:
    graphdef, state = nnx.split((model, optimizer, ema))

    def step(state, x, y):
        model, optimizer, ema = nnx.merge(graphdef, state)
        train_step(model, optimizer, ema, x, y)
        return nnx.state((model, optimizer, ema))

    return step, state


def test_accumulating_train_step_needs_no_host_sync():
    step, state = pure_step(*linear(optax.MultiSteps(optax.sgd(LR), every_k_schedule=K)))
    x, y = accumulation_data()
    jaxpr = str(jax.make_jaxpr(step)(state, x[0], y[0]))
    assert "cond" in jaxpr and "callback" not in jaxpr
    hlo = jax.jit(step).lower(state, x[0], y[0]).as_text()
    assert "callback" not in hlo and "outfeed" not in hlo


def test_accumulating_train_step_writes_the_ema_in_place_and_compiles_once():
    model, optimizer, ema = linear(optax.MultiSteps(optax.sgd(LR), every_k_schedule=K), 512)
    x, y = np.ones((N, 5), np.float32), np.ones((N, 512), np.float32)
    ema_bytes = sum(a.nbytes for a in jax.tree.leaves(nnx.state(ema)))

    def without_ema(model, optimizer, x, y):
        grads = nnx.grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
        optimizer.update(model, grads)

    mine = nnx.jit(train_step, donate_argnums=(0, 1, 2)).lower(model, optimizer, ema, x, y)
    plain = nnx.jit(without_ema, donate_argnums=(0, 1)).lower(model, optimizer, x, y)
    aliased = mine.compile().memory_analysis().alias_size_in_bytes
    assert aliased - plain.compile().memory_analysis().alias_size_in_bytes == ema_bytes
    traces = []

    def counting(*args):
        traces.append(1)
        train_step(*args)

    step = nnx.jit(counting, donate_argnums=(0, 1, 2))
    for _ in range(2 * K + 1):  # accumulating and applying calls, warmup and period
        step(model, optimizer, ema, x, y)
    assert len(traces) == 1 and int(ema.ema_state.step) == 2


def test_the_shared_rules_agree_with_linen_and_with_what_happened():
    """Over rejected, accumulating and applied mini-steps: one answer from all three."""
    tx = optax.MultiSteps(
        optax.sgd(LR), every_k_schedule=3, should_skip_update_fn=optax.skip_not_finite
    )
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    update = jax.jit(tx.update)
    pattern = [1, 1, 1, np.nan, 1, np.nan, 1, 1, 1, 1, 1, np.nan, np.nan, 1, 1, 1]
    seen = []
    for g in pattern:
        updates, new = update({"w": jnp.full(3, g, jnp.float32)}, state, params)
        happened = bool(jnp.any(updates["w"] != 0))
        between = bool(_accumulation.applied_between(state, new))
        after = bool(_accumulation.applied_after(new, "test"))
        assert between == after == bool(_optimizer_applied(state, new)) == happened, len(seen)
        seen.append(happened)
        state = new
    assert seen.count(True) == 4


# ------------------------------------------------------------------ bad input


def _custom_skip(updates, gradient_step, params):
    del gradient_step, params
    bad = ~jnp.isfinite(jax.tree.leaves(updates)[0]).all()
    return bad, {"rejected": bad}


def _opt(tx):
    model, optimizer, ema = linear(tx)
    grads = jax.tree.map(jnp.ones_like, nnx.state(model, nnx.Param))
    return model, optimizer, ema, grads


def _two_multi_steps():
    multi = optax.MultiSteps(optax.sgd(LR), every_k_schedule=2).gradient_transformation()
    model, optimizer, ema, grads = _opt(optax.chain(multi, multi))
    apply_grads(model, optimizer, ema, grads)


def _custom_skip_state():
    tx = optax.MultiSteps(optax.sgd(LR), every_k_schedule=2, should_skip_update_fn=_custom_skip)
    model, optimizer, ema, grads = _opt(tx)
    apply_grads(model, optimizer, ema, grads)


def _built_with(tx: Any = None, optimizer: Any = None) -> None:
    model = nnx.Linear(5, 3, rngs=nnx.Rngs(0))
    if tx is not None:
        optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    Ema(model, ACC_EMA, optimizer=optimizer)


def _update(**kwargs):
    model, _, ema = linear(optax.sgd(LR))
    ema.update(model, **kwargs)


_MULTI = optax.MultiSteps(optax.sgd(LR), every_k_schedule=2).gradient_transformation()
BAD = [
    (
        "built with two MultiSteps",
        lambda: _built_with(optax.chain(_MULTI, _MULTI)),
        ValueError,
        "opt_state holds 2 optax.MultiStepsState: Ema cannot tell",
    ),
    (
        "built with a custom skip state",
        lambda: _built_with(
            optax.MultiSteps(optax.sgd(LR), every_k_schedule=2, should_skip_update_fn=_custom_skip)
        ),
        ValueError,
        "Ema: the optax.MultiStepsState's skip_state has no 'should_skip' entry",
    ),
    (
        "built with an optax transform",
        lambda: _built_with(optimizer=optax.sgd(LR)),
        TypeError,
        "Ema: optimizer must be the nnx.Optimizer that trains the model (with an opt_state)",
    ),
    ("two MultiSteps", _two_multi_steps, ValueError, "opt_state holds 2 optax.MultiStepsState"),
    (
        "custom skip state",
        _custom_skip_state,
        ValueError,
        "Ema.update: the optax.MultiStepsState's skip_state has no 'should_skip' entry",
    ),
    (
        "optimizer and applied",
        lambda: _update(optimizer=linear(optax.sgd(LR))[1], applied=True),
        TypeError,
        "Ema.update takes optimizer= or applied=, not both",
    ),
    (
        "optimizer without opt_state",
        lambda: _update(optimizer=optax.sgd(LR)),
        TypeError,
        "Ema.update: optimizer must be the nnx.Optimizer whose update this follows",
    ),
    (
        "applied an int",
        lambda: _update(applied=1),
        TypeError,
        "Ema.update: applied must be a bool or a bool scalar array",
    ),
    (
        "applied a string",
        lambda: _update(applied="yes"),
        TypeError,
        "Ema.update: applied must be a bool or a bool scalar array",
    ),
    (
        "applied a vector",
        lambda: _update(applied=jnp.ones(2, bool)),
        TypeError,
        "Ema.update: applied must be a bool or a bool scalar array",
    ),
]


@pytest.mark.bad_input
@pytest.mark.parametrize(("what", "call", "error", "text"), BAD, ids=[b[0] for b in BAD])
def test_bad_input_names_the_problem(what, call, error, text):
    del what
    with pytest.raises(error, match=re.escape(text)) as info:
        call()
    assert type(info.value) is error


def test_a_checkpoint_of_an_ema_given_the_optimizer_resumes_bit_for_bit(tmp_path):
    """Save mid-accumulation, restore into fresh objects: the EMA still reads the optimizer's
    counters (shared, not copied), and the run ends where the uninterrupted one does."""
    import orbax.checkpoint as ocp

    from ema_jax import nnx as ema_nnx

    def build(seed: int) -> dict[str, Any]:
        model = nnx.Linear(5, 3, rngs=nnx.Rngs(seed))
        optimizer = nnx.Optimizer(model, optax.MultiSteps(optax.sgd(LR), K), wrt=nnx.Param)
        return {
            "model": model,
            "optimizer": optimizer,
            "ema": Ema(model, ACC_EMA, optimizer=optimizer),
        }

    step = nnx.jit(plain_step, donate_argnums=(0, 1, 2))
    x, y = accumulation_data()
    calls = [(x[t % STEPS], y[t % STEPS]) for t in range(14)]
    whole = build(0)
    for xb, yb in calls:
        step(whole["model"], whole["optimizer"], whole["ema"], xb, yb)
    first = build(0)
    for xb, yb in calls[:7]:  # 7 calls at k=4: one optimizer step, 3 micro-batches pending
        step(first["model"], first["optimizer"], first["ema"], xb, yb)
    handlers = {"item_handlers": ocp.StandardCheckpointHandler()}
    with ocp.CheckpointManager(tmp_path, **handlers) as m:
        ema_nnx.save_checkpoint(m, 7, first)
    resumed = build(1)  # other initial weights, all overwritten
    with ocp.CheckpointManager(tmp_path, **handlers) as m:
        assert ema_nnx.restore_checkpoint(m, resumed) == 7
    assert int(resumed["ema"].ema_state.step) == 1
    for xb, yb in calls[7:]:
        step(resumed["model"], resumed["optimizer"], resumed["ema"], xb, yb)
    assert (
        int(resumed["optimizer"].step[...]) == 14 and int(resumed["ema"].ema_state.step) == 14 // K
    )
    for name in whole:
        jax.tree.map(
            np.testing.assert_array_equal,
            host(nnx.state(resumed[name])),
            host(nnx.state(whole[name])),
        )

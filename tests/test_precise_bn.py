"""Precise BatchNorm statistics: pycls's compute_precise_bn_stats, against NumPy."""

from __future__ import annotations

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from support import check_device_result
from support import precise_bn_worker
from support import run_device_worker
from support.models import EMA
from support.models import BnNet
from support.models import Mlp
from support.models import batches
from support.models import make_state
from support.models import train_step
from support.precise_bn_worker import TwoBn
from support.precise_bn_worker import check_against_numpy
from support.precise_bn_worker import numpy_stats
from support.precise_bn_worker import setup

import ema_jax
from ema_jax import _batch_stats


def two_bn_setup():
    """TwoBn with every parameter perturbed, and 5 batches of 6."""
    variables, xs = setup(batch=6, num_batches=5)
    return TwoBn(), variables, xs


@pytest.mark.parametrize(
    ("num_samples", "used"),
    [(8192, 5), (24, 4), (29, 4), (6, 1)],
    ids=["all_batches", "num_samples_cuts", "rounds_down", "one_batch"],
)
@pytest.mark.parametrize("container", ["list", "generator"])
def test_matches_numpy_means_of_batch_means_and_variances(num_samples, used, container):
    model, variables, xs = two_bn_setup()
    given = xs if container == "list" else (x for x in xs)
    got = ema_jax.precise_batch_stats(model.apply, variables, given, num_samples=num_samples)
    check_against_numpy(got, variables, xs[:used])
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(got))
    if container == "generator":  # consumed only as far as needed
        assert len(list(given)) == len(xs) - used


def test_momentum_and_everything_else_untouched():
    model, variables, xs = two_bn_setup()
    stats = ema_jax.precise_batch_stats(model.apply, variables, xs)
    assert jax.tree.structure(stats) == jax.tree.structure(variables["batch_stats"])
    # The layers still use their own momentum afterwards: 0.9 and 0.99.
    new = {**variables, "batch_stats": stats}
    _, updates = model.apply(new, xs[0], train=True, mutable=["batch_stats"])
    batch = numpy_stats(jax.tree.map(np.asarray, new), np.asarray(xs[0]))
    for name, node, momentum in (
        ("input_bn", lambda t: t["input_bn"], 0.9),
        ("block/bn", lambda t: t["block"]["bn"], 0.99),
    ):
        for stat in ("mean", "var"):
            want = momentum * node(stats)[stat] + (1 - momentum) * batch[name][stat]
            np.testing.assert_allclose(node(updates["batch_stats"])[stat], want, rtol=1e-5)


def test_nonfinite_running_statistics_do_not_leak_in():
    model, variables, xs = two_bn_setup()
    clean = ema_jax.precise_batch_stats(model.apply, variables, xs)
    poisoned = {**variables, "batch_stats": jax.tree.map(lambda a: a * np.nan, clean)}
    got = ema_jax.precise_batch_stats(model.apply, poisoned, xs)
    jax.tree.map(np.testing.assert_array_equal, got, clean)


def test_other_batch_stats_entries_are_returned_unchanged():
    model, variables, xs = two_bn_setup()
    counter = jnp.array(7, jnp.int32)
    extra = {**variables, "batch_stats": {**variables["batch_stats"], "counter": counter}}
    got = ema_jax.precise_batch_stats(model.apply, extra, xs)
    assert got["counter"] is counter


def train(n: int = 6):
    state = make_state(BnNet(), EMA)
    step = jax.jit(train_step, donate_argnums=0)
    for x, y in batches(n):
        state, _ = step(state, x, y)
    return state


def test_state_recomputes_raw_and_ema_statistics_in_one_pass():
    state = train()
    xs = [x for x, _ in batches(5, seed=7)]
    raw = {"params": state.params, "batch_stats": state.batch_stats}
    want_raw = ema_jax.precise_batch_stats(state.apply_fn, raw, xs)
    want_ema = ema_jax.precise_batch_stats(state.apply_fn, state.ema_variables(), xs)
    seen = []
    new = state.with_precise_batch_stats(x for x in xs if not seen.append(x))
    assert len(seen) == len(xs)  # one pass for both models
    jax.tree.map(np.testing.assert_array_equal, new.batch_stats, want_raw)
    jax.tree.map(np.testing.assert_array_equal, new.ema_batch_stats, want_ema)
    assert not np.allclose(want_raw["BatchNorm_0"]["mean"], want_ema["BatchNorm_0"]["mean"])
    # Everything else is the same arrays.
    assert new.params is state.params and new.ema_params is state.ema_params
    assert new.step is state.step and new.opt_state is state.opt_state
    assert new.ema_state.step is state.ema_state.step


def test_ema_keeps_averaging_from_the_precise_statistics():
    state = train(6)  # step 6: an EMA update step (period 2), after warmup
    state = state.with_precise_batch_stats([x for x, _ in batches(3, seed=7)])
    reference = EMA.init({"params": state.ema_params, "batch_stats": state.ema_batch_stats})
    reference = reference._replace(step=state.ema_state.step)
    x, y = batches(1, seed=9)[0]
    state, _ = jax.jit(train_step)(state, x, y)
    reference = EMA.update({"params": state.params, "batch_stats": state.batch_stats}, reference)
    jax.tree.map(np.testing.assert_array_equal, state.ema_state.ema, reference.ema)


def test_compiles_once_per_run():
    state = train(2)
    traces = []

    def apply_fn(*args, **kwargs):
        traces.append(1)
        return BnNet().apply(*args, **kwargs)

    state = state.replace(apply_fn=apply_fn)

    def cache_sizes():
        return _batch_stats._accumulate._cache_size(), _batch_stats._mean._cache_size()

    sizes = [cache_sizes()]
    for epoch in range(3):
        xs = [x for x, _ in batches(4, seed=epoch)]
        state = state.with_precise_batch_stats(xs)
        raw = {"params": state.params, "batch_stats": state.batch_stats}
        ema_jax.precise_batch_stats(apply_fn, raw, xs)
        sizes.append(cache_sizes())
    # The first epoch compiles the loop once for the pair (raw, EMA) and once for a
    # single model (the final division may already be cached from other tests: it
    # depends only on the statistics' shapes); later epochs compile nothing.
    assert sizes[1][0] - sizes[0][0] == 2 and sizes[1][1] - sizes[0][1] <= 2
    assert sizes[1] == sizes[2] == sizes[3]
    # The model is traced once for the statistics' shapes and once for the loop:
    # twice for the pair (two models each), twice for the single model.
    assert len(traces) == 6


WORKER = Path(precise_bn_worker.__file__)


@pytest.fixture(scope="module")
def device_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    workdir = tmp_path_factory.mktemp("precise_bn")
    report = workdir / "results.json"
    return run_device_worker(WORKER, [str(report)], report)


@pytest.mark.slow
@pytest.mark.xdist_group("precise_bn")  # one worker start per run
@pytest.mark.parametrize("name", sorted(precise_bn_worker.CHECKS))
def test_on_8_simulated_devices(device_results, name):
    check_device_result(device_results, name)


# The bad-input cases: (what is wrong, call, exception, text of the message).
def _mlp_variables():
    return Mlp().init(jax.random.key(0), jnp.ones((4, 5)))


def _bn_variables():
    return BnNet().init(jax.random.key(0), jnp.ones((4, 5)))


X = [jnp.ones((4, 5))] * 3
APPLY = BnNet().apply

BAD = [
    (
        "no batch_stats collection",
        lambda: ema_jax.precise_batch_stats(Mlp().apply, _mlp_variables(), X),
        ValueError,
        "variables has no 'batch_stats' collection (got ['params'])",
    ),
    (
        "no BatchNorm ran",
        lambda: ema_jax.precise_batch_stats(
            Mlp().apply, {**_mlp_variables(), "batch_stats": {"x": jnp.zeros(2)}}, X
        ),
        ValueError,
        "the model ran no flax.linen.BatchNorm layer",
    ),
    (
        "empty batches",
        lambda: ema_jax.precise_batch_stats(APPLY, _bn_variables(), []),
        ValueError,
        "batches is empty",
    ),
    (
        "num_samples below the batch size",
        lambda: ema_jax.precise_batch_stats(APPLY, _bn_variables(), X, num_samples=3),
        ValueError,
        "num_samples=3 is less than the batch size 4",
    ),
    (
        "zero num_samples",
        lambda: ema_jax.precise_batch_stats(APPLY, _bn_variables(), X, num_samples=0),
        ValueError,
        "num_samples must be an integer in [1, 2**31 - 1], got 0",
    ),
    (
        "float num_samples",
        lambda: ema_jax.precise_batch_stats(APPLY, _bn_variables(), X, num_samples=8192.0),
        ValueError,
        "num_samples must be an integer in [1, 2**31 - 1], got 8192.0",
    ),
    (
        "batches not iterable",
        lambda: ema_jax.precise_batch_stats(APPLY, _bn_variables(), 5),
        TypeError,
        "batches must be an iterable of model inputs, got int",
    ),
    (
        "a batch of another shape",
        lambda: ema_jax.precise_batch_stats(
            APPLY, _bn_variables(), [jnp.ones((4, 5)), jnp.ones((3, 5))]
        ),
        ValueError,
        "batch 1 is float32[3, 5], but batch 0 was float32[4, 5]",
    ),
    (
        "a scalar batch",
        lambda: ema_jax.precise_batch_stats(APPLY, _bn_variables(), [1.0]),
        ValueError,
        "with a leading batch axis, got float 1.0",
    ),
    (
        "evaluation mode",
        lambda: ema_jax.precise_batch_stats(
            APPLY, _bn_variables(), X, apply_kwargs={"train": False}
        ),
        ValueError,
        "the BatchNorm at BatchNorm_0 ran with use_running_average=True",
    ),
    (
        "mutable in apply_kwargs",
        lambda: ema_jax.precise_batch_stats(
            APPLY, _bn_variables(), X, apply_kwargs={"mutable": True}
        ),
        TypeError,
        "apply_kwargs must be a mapping of keyword arguments for apply_fn, without 'mutable'",
    ),
    (
        "unhashable apply_kwargs",
        lambda: ema_jax.precise_batch_stats(
            APPLY, _bn_variables(), X, apply_kwargs={"train": [True]}
        ),
        TypeError,
        "apply_kwargs values must be hashable",
    ),
    (
        "apply_fn not callable",
        lambda: ema_jax.precise_batch_stats("model.apply", _bn_variables(), X),
        TypeError,
        "apply_fn must be callable (e.g. model.apply), got 'model.apply'",
    ),
    (
        "state without batch_stats",
        lambda: make_state(Mlp(), EMA).with_precise_batch_stats(X),
        ValueError,
        "with_precise_batch_stats needs a state with batch_stats",
    ),
]


@pytest.mark.bad_input
@pytest.mark.parametrize(("what", "call", "error", "text"), BAD, ids=[b[0] for b in BAD])
def test_bad_input_names_the_problem(what, call, error, text):
    del what
    with pytest.raises(error, match=re.escape(text)) as info:
        call()
    assert type(info.value) is error

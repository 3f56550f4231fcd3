"""Precise BatchNorm statistics for NNX models: pycls's compute_precise_bn_stats, against NumPy."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from support import assert_trees_equal
from support import check_device_result
from support import nnx_precise_bn_worker
from support import run_device_worker
from support.models import EMA
from support.models import NnxNet
from support.models import batches
from support.models import nnx_setup
from support.models import nnx_train_step
from support.nnx_precise_bn_worker import TwoBn
from support.nnx_precise_bn_worker import check_against_numpy
from support.nnx_precise_bn_worker import linen_params
from support.nnx_precise_bn_worker import setup
from support.precise_bn_worker import numpy_stats

import ema_jax
from ema_jax import _batch_stats
from ema_jax.nnx import Ema
from ema_jax.nnx import precise_batch_stats
from ema_jax.nnx import recompute_batch_stats

STATS = nnx.BatchStat


def two_bn_setup() -> tuple[TwoBn, list[np.ndarray]]:
    """TwoBn with every parameter and statistic perturbed, and 5 batches of 6."""
    return setup(batch=6, num_batches=5)


def pure(tree: Any) -> Any:
    """Plain NumPy arrays, safe from donation and comparable by path."""
    return jax.tree.map(np.array, jax.device_get(nnx.as_pure(tree)))


def assert_equal(got: Any, want: Any) -> None:
    assert_trees_equal(pure(got), pure(want))


@pytest.mark.parametrize(
    ("num_samples", "used"),
    [(8192, 5), (24, 4), (29, 4), (6, 1)],
    ids=["all_batches", "num_samples_cuts", "rounds_down", "one_batch"],
)
@pytest.mark.parametrize("container", ["list", "generator"])
def test_matches_numpy_means_of_batch_means_and_variances(num_samples, used, container):
    model, xs = two_bn_setup()
    given = xs if container == "list" else (x for x in xs)
    got = precise_batch_stats(model, given, num_samples=num_samples)
    check_against_numpy(got, model, xs[:used])
    assert {v.get_value().dtype for _, v in nnx.to_flat_state(got)} == {jnp.dtype(jnp.float32)}
    if container == "generator":  # consumed only as far as needed
        assert len(list(given)) == len(xs) - used


def test_returns_new_batch_stats_and_leaves_the_model_alone():
    model, xs = two_bn_setup()
    before = pure(nnx.state(model))
    got = precise_batch_stats(model, xs)
    assert [(p, type(v)) for p, v in nnx.to_flat_state(got)] == [
        (("block", "bn", "mean"), STATS),
        (("block", "bn", "var"), STATS),
        (("input_bn", "mean"), STATS),
        (("input_bn", "var"), STATS),
    ]
    assert got["input_bn"]["mean"] is not model.input_bn.mean  # new variables
    assert_equal(nnx.state(model), before)
    assert model.input_bn.momentum == 0.9 and model.block.bn.momentum == 0.99
    assert model.input_bn.use_running_average is False


def test_momentum_and_everything_else_untouched_after_installing():
    model, xs = two_bn_setup()
    stats = precise_batch_stats(model, xs)
    nnx.update(model, stats)
    assert_equal(nnx.state(model, STATS), stats)
    # The layers still use their own momentum afterwards: 0.9 and 0.99.
    model(jnp.asarray(xs[0]))
    batch = numpy_stats(linen_params(model), np.asarray(xs[0]))
    for name, layer, momentum in (
        ("input_bn", model.input_bn, 0.9),
        ("block/bn", model.block.bn, 0.99),
    ):
        for stat in ("mean", "var"):
            node = stats["input_bn"] if name == "input_bn" else stats["block"]["bn"]
            want = momentum * node[stat].get_value() + (1 - momentum) * batch[name][stat]
            np.testing.assert_allclose(getattr(layer, stat).get_value(), want, rtol=1e-5)


def test_evaluation_mode_views_still_get_training_statistics():
    model, xs = two_bn_setup()
    want = precise_batch_stats(model, xs)
    got = precise_batch_stats(nnx.view(model, use_running_average=True), xs)
    assert_equal(got, want)


def test_nonfinite_running_statistics_do_not_leak_in():
    model, xs = two_bn_setup()
    clean = precise_batch_stats(model, xs)
    poisoned = jax.tree.map(lambda a: a * np.nan, nnx.as_pure(clean))
    nnx.update(model, poisoned)
    assert_equal(precise_batch_stats(model, xs), clean)


# ------------------------------------------------------------------ with an Ema


def trained(steps: int = 6) -> tuple[NnxNet, Any, Ema]:
    model, optimizer, ema = nnx_setup()
    step = nnx.jit(nnx_train_step, donate_argnums=(0, 1, 2))
    for x, y in batches(steps):
        step(model, optimizer, ema, x, y)
    return nnx.view(model, deterministic=True), optimizer, ema


def test_recompute_does_model_and_ema_in_one_pass():
    model, _, ema = trained()
    xs = [x for x, _ in batches(5, seed=7)]
    want_raw = pure(precise_batch_stats(model, xs))
    want_ema = pure(precise_batch_stats(ema.apply_to(model), xs))
    params, step = pure(nnx.state(ema, nnx.Not(STATS))), int(ema.ema_state.step)
    seen = []
    recompute_batch_stats(model, ema, (x for x in xs if not seen.append(x)))
    assert len(seen) == len(xs)  # one pass for both models
    assert_equal(nnx.state(model, STATS), want_raw)
    assert_equal(nnx.state(ema.params, STATS), want_ema)
    assert not np.allclose(want_raw["bn"]["mean"], want_ema["bn"]["mean"])
    # Everything else is unchanged.
    assert_equal(nnx.state(ema, nnx.Not(STATS)), params)
    assert int(ema.ema_state.step) == step


def test_ema_keeps_averaging_from_the_precise_statistics():
    model, optimizer, ema = trained(6)  # step 6: an EMA update step (period 2), after warmup
    recompute_batch_stats(model, ema, [x for x, _ in batches(3, seed=7)])
    reference = EMA.init(pure(ema.params))._replace(step=ema.ema_state.step)
    x, y = batches(1, seed=9)[0]
    nnx.jit(nnx_train_step)(model, optimizer, ema, x, y)
    reference = EMA.update(pure(nnx.state(model, nnx.Not(nnx.RngState))), reference)
    assert_equal(ema.params, reference.ema)


def test_several_averages_each_get_the_statistics_of_their_own_weights():
    schedules = {"fast": ema_jax.schedules.constant(0.5), "slow": ema_jax.schedules.constant(0.9)}
    several = ema_jax.ema(schedules)
    model, optimizer, ema = nnx_setup(several)
    model = nnx.view(model, deterministic=True)
    for x, y in batches(4):
        nnx.jit(nnx_train_step)(model, optimizer, ema, x, y)
    xs = [x for x, _ in batches(3, seed=7)]
    want = {k: pure(precise_batch_stats(ema.apply_to(model, k), xs)) for k in ("fast", "slow")}
    recompute_batch_stats(model, ema, xs)
    for k, name in enumerate(("fast", "slow")):
        for stat in ("mean", "var"):
            got = ema.params["bn"][stat].get_value()[..., k]
            np.testing.assert_array_equal(got, want[name]["bn"][stat])
    assert not np.allclose(want["fast"]["bn"]["mean"], want["slow"]["bn"]["mean"])


# ------------------------------------------------------------------ compilation


def test_compiles_once_per_run():
    model, _, ema = trained(2)
    traces = []

    class Counting(NnxNet):
        def __call__(self, x):
            traces.append(1)
            return super().__call__(x)

    counting = Counting(nnx.Rngs(0))
    nnx.update(counting, nnx.state(model))
    counting = nnx.view(counting, deterministic=True)

    def cache_sizes():
        return _batch_stats._accumulate._cache_size(), _batch_stats._mean._cache_size()

    sizes = [cache_sizes()]
    for epoch in range(3):
        xs = [x for x, _ in batches(4, seed=epoch)]
        recompute_batch_stats(counting, ema, xs)
        precise_batch_stats(counting, xs)
        sizes.append(cache_sizes())
    # The first epoch compiles the loop once for the pair (raw, EMA) and once for a
    # single model (the final division may already be cached from other tests: it
    # depends only on the statistics' shapes); later epochs compile nothing.
    assert sizes[1][0] - sizes[0][0] == 2 and sizes[1][1] - sizes[0][1] <= 2
    assert sizes[1] == sizes[2] == sizes[3]
    # The model is traced once for the statistics' shapes and once for the loop:
    # twice for the pair (two models each), twice for the single model.
    assert len(traces) == 6


# ------------------------------------------------------------------ 8 devices

WORKER = Path(nnx_precise_bn_worker.__file__)


@pytest.fixture(scope="module")
def device_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    workdir = tmp_path_factory.mktemp("nnx_precise_bn")
    report = workdir / "results.json"
    return run_device_worker(WORKER, [str(report)], report)


@pytest.mark.slow
@pytest.mark.xdist_group("nnx_precise_bn")  # one worker start per run
@pytest.mark.parametrize("name", sorted(nnx_precise_bn_worker.CHECKS))
def test_on_8_simulated_devices(device_results, name):
    check_device_result(device_results, name)


# ------------------------------------------------------------------ bad input


class Plain(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.lin = nnx.Linear(5, 3, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.lin(x)


class EvalInCall(nnx.Module):
    """A model that asks its BatchNorm for the running statistics in the call itself."""

    def __init__(self, rngs: nnx.Rngs):
        self.lin = nnx.Linear(5, 3, rngs=rngs)
        self.bn = nnx.BatchNorm(3, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.bn(self.lin(x), use_running_average=True)


class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.BatchNorm(use_running_average=False)(x)


def _bn():
    return NnxNet(nnx.Rngs(0))


X = [jnp.ones((4, 5))] * 3

BAD = [
    (
        "no BatchNorm",
        lambda: precise_batch_stats(Plain(nnx.Rngs(0)), X),
        ValueError,
        "precise_batch_stats: the model has no flax.nnx.BatchNorm layer",
    ),
    (
        "empty batches",
        lambda: precise_batch_stats(_bn(), []),
        ValueError,
        "batches is empty",
    ),
    (
        "num_samples below the batch size",
        lambda: precise_batch_stats(_bn(), X, num_samples=3),
        ValueError,
        "num_samples=3 is less than the batch size 4",
    ),
    (
        "not an NNX model: linen",
        lambda: precise_batch_stats(LinenNet(), X),
        TypeError,
        "precise_batch_stats: model must be an NNX model (an nnx.Module), got LinenNet",
    ),
    (
        "not an NNX model: a state",
        lambda: precise_batch_stats(nnx.state(_bn()), X),
        TypeError,
        "precise_batch_stats: model must be an NNX model (an nnx.Module), got State",
    ),
    (
        "batches not iterable",
        lambda: precise_batch_stats(_bn(), 5),
        TypeError,
        "batches must be an iterable of model inputs, got int",
    ),
    (
        "a batch of another shape",
        lambda: precise_batch_stats(_bn(), [jnp.ones((4, 5)), jnp.ones((3, 5))]),
        ValueError,
        "batch 1 is float32[3, 5], but batch 0 was float32[4, 5]",
    ),
    (
        "BatchNorm in evaluation mode in the call",
        lambda: precise_batch_stats(EvalInCall(nnx.Rngs(0)), X),
        ValueError,
        "the BatchNorm at model.bn computed no batch statistics",
    ),
    (
        "recompute: ema not an Ema",
        lambda: recompute_batch_stats(_bn(), nnx.EMA(_bn(), 0.9, only=nnx.Param), X),
        TypeError,
        "recompute_batch_stats: ema must be the model's ema_jax.nnx.Ema, got EMA",
    ),
    (
        "recompute: the EMA holds no statistics",
        lambda: recompute_batch_stats(_bn(), Ema(_bn(), EMA, only=nnx.Param), X),
        ValueError,
        "recompute_batch_stats: the EMA does not hold model.bn.mean (only=",
    ),
    (
        "recompute: another model",
        lambda: recompute_batch_stats(NnxNet(nnx.Rngs(0), width=16), Ema(_bn(), EMA), X),
        ValueError,
        "Ema.apply_to: model does not match the EMA's variables",
    ),
    (
        "recompute: no BatchNorm",
        lambda: recompute_batch_stats(Plain(nnx.Rngs(0)), Ema(Plain(nnx.Rngs(0)), EMA), X),
        ValueError,
        "recompute_batch_stats: the model has no flax.nnx.BatchNorm layer",
    ),
]


@pytest.mark.bad_input
@pytest.mark.parametrize(("what", "call", "error", "text"), BAD, ids=[b[0] for b in BAD])
def test_bad_input_names_the_problem(what, call, error, text):
    del what
    with pytest.raises(error, match=re.escape(text)) as info:
        call()
    assert type(info.value) is error


def test_a_bad_input_leaves_the_model_and_the_ema_alone():
    model = _bn()
    ema = Ema(model, EMA)
    arrays = nnx.Not(nnx.RngState)
    before = pure(nnx.state((model, ema), arrays))
    with pytest.raises(ValueError, match="batches is empty"):
        recompute_batch_stats(model, ema, [])
    assert_equal(nnx.state((model, ema), arrays), before)

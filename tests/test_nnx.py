"""`ema_jax.nnx.Ema`: nnx.EMA's API over ema_jax's transforms, in NNX training loops.

The numbers are the pure transform's (or nnx.EMA's, for a constant decay) bit for
bit; the structure (aliasing, one compilation, the skipped branch) is read from the
compiled program; checkpoints round-trip through orbax and abstract targets.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from support import arithmetic
from support import assert_trees_equal
from support import called
from support import computations
from support import is_big
from support.models import EMA
from support.models import PYCLS
from support.models import NnxNet
from support.models import batches
from support.models import nnx_setup
from support.models import nnx_train_step

import ema_jax
from ema_jax.nnx import Ema
from ema_jax.nnx import EmaCount

NOT_RNG = nnx.Not(nnx.RngState)  # what the default `only` averages or copies


def host(tree: Any) -> Any:
    """A NumPy copy, safe from donation."""
    return jax.tree.map(np.array, jax.device_get(tree))


def nnx_jit_runner(model, optimizer, ema, train_step=nnx_train_step):
    """``run(x, y)``: a train step under nnx.jit, everything donated; returns (model, ema)."""
    step = nnx.jit(train_step, donate_argnums=(0, 1, 2))

    def run(x, y):
        step(model, optimizer, ema, x, y)
        return model, ema

    return run


def split_merge_runner(model, optimizer, ema, train_step=nnx_train_step):
    """The same, as a pure function: jax.jit over nnx.split/nnx.merge, state donated."""
    graphdef, state = nnx.split((model, optimizer, ema))

    @functools.partial(jax.jit, donate_argnums=0)
    def step(state, x, y):
        model, optimizer, ema = nnx.merge(graphdef, state)
        train_step(model, optimizer, ema, x, y)
        return nnx.state((model, optimizer, ema))

    holder = [state]

    def run(x, y):
        holder[0] = step(holder[0], x, y)
        model, _, ema = nnx.merge(graphdef, holder[0])
        return model, ema

    return run


RUNNERS = {"nnx_jit": nnx_jit_runner, "jax_jit_split_merge": split_merge_runner}


# ------------------------------------------------------------------ numbers


@pytest.mark.parametrize("runner", sorted(RUNNERS))
def test_equals_the_pure_transform_on_the_same_variables(runner):
    # 12 steps: the warmup epoch (3 steps), then updates every 2 steps within each epoch.
    model, optimizer, ema = nnx_setup()
    seen = [host(nnx.as_pure(nnx.state(model, NOT_RNG)))]
    run = RUNNERS[runner](model, optimizer, ema)
    for x, y in batches(12):
        model, ema = run(x, y)
        seen.append(host(nnx.as_pure(nnx.state(model, NOT_RNG))))
    pure = EMA.init(seen[0])
    update = jax.jit(EMA.update)
    for params in seen[1:]:
        pure = update(params, pure)
    assert int(ema.ema_state.step) == 12
    assert_trees_equal(ema.ema_state, pure)


def test_default_only_averages_floats_copies_integers_and_leaves_rng_alone():
    model, optimizer, ema = nnx_setup()
    assert {path for path, _ in nnx.to_flat_state(ema.params)} == {
        ("lin", "kernel"),
        ("lin", "bias"),
        ("bn", "scale"),
        ("bn", "bias"),
        ("bn", "mean"),
        ("bn", "var"),
        ("out", "kernel"),
        ("out", "bias"),
        ("calls",),
    }  # Param, BatchStat and the integer Variable; no RNG key or count
    assert type(ema.params["bn"]["mean"]) is nnx.BatchStat
    assert type(ema.params["calls"]) is nnx.Variable
    run = nnx_jit_runner(model, optimizer, ema)
    for x, y in batches(5):
        run(x, y)
    # Calls 0, 2 and 3 updated (warmup, then every 2 steps of the 3-step epoch): the
    # counter is the model's at call 3, copied exactly, as an int32.
    assert int(model.calls[...]) == 5
    assert ema.params["calls"].get_value().dtype == jnp.int32
    assert int(ema.params["calls"][...]) == 4
    # The statistics are averaged: the EMA's are not the model's.
    mean = np.asarray(ema.params["bn"]["mean"][...])
    assert not np.array_equal(mean, np.asarray(model.bn.mean[...]))
    view = ema.apply_to(model)
    assert view.drop.rngs.key is model.drop.rngs.key
    assert view.drop.rngs.count is model.drop.rngs.count


def test_only_selects_what_is_averaged():
    model = NnxNet(nnx.Rngs(0))
    ema = Ema(model, EMA, only=nnx.Param)
    assert {type(v) for _, v in nnx.to_flat_state(ema.params)} == {nnx.Param}
    view = ema.apply_to(model)
    assert view.bn.mean is model.bn.mean  # outside `only`: the model's own
    assert view.bn.scale is ema.params["bn"]["scale"]


def run_beside_nnx_ema(nonfinite: str, steps: int = 300):
    decay = 0.99
    model = NnxNet(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.sgd(0.1, momentum=0.9), wrt=nnx.Param)
    theirs = nnx.EMA(model, decay, only=nnx.Param)
    schedule = ema_jax.schedules.constant(decay, form="nnx")  # nnx.EMA's blend
    ours = Ema(model, ema_jax.ema(schedule, nonfinite=nonfinite), only=nnx.Param)

    @nnx.jit(donate_argnums=(0, 1))
    def train_step(model, optimizer, x, y):
        grads = nnx.grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
        optimizer.update(model, grads)

    update_theirs = nnx.jit(lambda ema, model: ema.update(model), donate_argnums=0)
    update_ours = nnx.jit(lambda ema, model: ema.update(model), donate_argnums=0)
    peak = 0.0
    for x, y in batches(steps):
        train_step(model, optimizer, x, y)
        update_theirs(theirs, model)
        update_ours(ours, model)
        pure = nnx.as_pure(nnx.state(model, nnx.Param))
        peak = max(peak, *(float(jnp.max(jnp.abs(v))) for v in jax.tree.leaves(pure)))
    assert int(ours.ema_state.step) == steps
    return nnx.as_pure(ours.params), nnx.as_pure(theirs.params), peak


def test_constant_schedule_without_the_guard_matches_nnx_ema_bit_for_bit():
    ours, theirs, _ = run_beside_nnx_ema("propagate")  # nnx.EMA has no guard
    assert_trees_equal(ours, theirs)


def test_constant_schedule_with_the_guard_matches_nnx_ema_to_rounding():
    # With the guard's select after the blend, XLA:CPU contracts it to another fma
    # (see schedules.constant): an ulp of the largest value per update at most.
    ours, theirs, peak = run_beside_nnx_ema("skip")
    eps = float(jnp.finfo(jnp.float32).eps)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=300 * eps * peak)


# ------------------------------------------------------------------ apply_to


def test_apply_to_is_a_view_that_follows_later_updates():
    model, optimizer, ema = nnx_setup()
    view = ema.apply_to(model)
    assert view is not model and view.bn is not model.bn
    run = nnx_jit_runner(model, optimizer, ema)
    for x, y in batches(4):
        run(x, y)
    assert view.lin.kernel is ema.params["lin"]["kernel"]
    assert_trees_equal(nnx.as_pure(nnx.state(view, NOT_RNG)), ema.ema_state.ema)
    # It evaluates as the model with the EMA's values would.
    expected = nnx.clone(model)
    nnx.update(expected, nnx.as_pure(ema.params))
    x = batches(1, seed=7)[0][0]
    view.eval()
    expected.eval()
    assert model.bn.use_running_average is False  # eval() on the view leaves the model be
    np.testing.assert_array_equal(np.asarray(view(x)), np.asarray(expected(x)))


# ------------------------------------------------------------------ compiled structure


def ema_bytes(ema: Ema) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(nnx.state(ema)))


def plain_step(model, optimizer, x, y):
    grads = nnx.grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
    optimizer.update(model, grads)


def test_nnx_jit_train_step_donates_every_ema_buffer():
    model, optimizer, ema = nnx_setup(width=512)
    x, y = batches(1)[0]
    with_ema = nnx.jit(nnx_train_step, donate_argnums=(0, 1, 2)).lower(model, optimizer, ema, x, y)
    without = nnx.jit(plain_step, donate_argnums=(0, 1)).lower(model, optimizer, x, y)
    mine, plain = with_ema.compile().memory_analysis(), without.compile().memory_analysis()
    assert mine.alias_size_in_bytes - plain.alias_size_in_bytes == ema_bytes(ema)
    # And at run time: the EMA's old buffers are gone, the new ones in their place.
    old = ema.params["out"]["kernel"].get_value()
    nnx.jit(nnx_train_step, donate_argnums=(0, 1, 2))(model, optimizer, ema, x, y)
    assert old.is_deleted() and not ema.params["out"]["kernel"].get_value().is_deleted()


def test_split_merge_update_aliases_every_ema_buffer():
    model, _, ema = nnx_setup(width=512)
    ema_def, ema_state = nnx.split(ema)
    model_def, model_state = nnx.split(model)

    def update(ema_state, model_state):
        ema = nnx.merge(ema_def, ema_state)
        ema.update(nnx.merge(model_def, model_state))
        return nnx.state(ema)

    compiled = jax.jit(update, donate_argnums=0).lower(ema_state, model_state).compile()
    memory = compiled.memory_analysis()
    assert memory.alias_size_in_bytes == ema_bytes(ema)
    assert memory.output_size_in_bytes - ema_bytes(ema) <= 8 * len(jax.tree.leaves(ema_state))


@pytest.mark.parametrize("runner", sorted(RUNNERS))
def test_one_compilation_for_a_whole_run(runner):
    traces = []

    def counting_step(*args):
        traces.append(1)
        return nnx_train_step(*args)

    model, optimizer, ema = nnx_setup()
    run = RUNNERS[runner](model, optimizer, ema, counting_step)
    for x, y in batches(10):  # warmup, updating and skipped calls, three epochs
        model, ema = run(x, y)
    assert int(ema.ema_state.step) == 10
    assert len(traces) == 1


def skipped_branch_work(compiled: Any) -> tuple[list[str], set[str], set[str]]:
    """Ops on big arrays outside the conditional, and the two branches' big-array ops."""
    comps, entry = computations(compiled.as_text())
    passing = {"parameter", "get-tuple-element", "tuple", "bitcast", "conditional"}
    outside = [op for shape, op, _ in comps[entry] if is_big(shape) and op not in passing]
    (cond,) = [rest for _, op, rest in comps[entry] if op == "conditional"]
    branches = called(cond, "branch_computations") or [
        *called(cond, "false_computation"),
        *called(cond, "true_computation"),
    ]
    skip, fold = sorted((arithmetic(comps, b) for b in branches), key=len)
    return outside, skip, fold


def test_skipped_calls_touch_no_parameter_sized_array():
    model, _, ema = nnx_setup(width=4096)  # every floating variable but one bias >= BIG
    # Under nnx.jit, donating the model too: nnx.jit returns every argument's
    # variables and copies those it may not overwrite (a train step donates it anyway).
    update = nnx.jit(lambda ema, model: ema.update(model), donate_argnums=(0, 1))
    outside, skip, fold = skipped_branch_work(update.lower(ema, model).compile())
    assert outside == []
    assert skip == set()
    assert {"multiply", "subtract"} <= fold


# ------------------------------------------------------------------ precision


def test_bf16_model_with_an_fp32_ema():
    ema32 = ema_jax.normalized_ema(
        **PYCLS,
        ema_dtype=jnp.float32,
    )
    model, optimizer, ema = nnx_setup(ema32, param_dtype=jnp.bfloat16)
    assert model.lin.kernel.get_value().dtype == jnp.bfloat16
    floats = [v for _, v in nnx.to_flat_state(ema.params) if type(v) is not nnx.Variable]
    assert {v.get_value().dtype for v in floats} == {jnp.dtype(jnp.float32)}
    seen = [host(nnx.as_pure(nnx.state(model, NOT_RNG)))]
    run = nnx_jit_runner(model, optimizer, ema)
    for x, y in batches(8):
        run(x, y)
        seen.append(host(nnx.as_pure(nnx.state(model, NOT_RNG))))
    pure = ema32.init(seen[0])
    for params in seen[1:]:
        pure = jax.jit(ema32.update)(params, pure)
    assert_trees_equal(ema.ema_state, pure)
    view = ema.apply_to(model)
    view.eval()
    assert np.isfinite(np.asarray(view(batches(1)[0][0]), np.float32)).all()


# ------------------------------------------------------------------ checkpoints


def test_orbax_round_trip_into_an_eval_shape_target(tmp_path):
    model, optimizer, ema = nnx_setup()
    run = nnx_jit_runner(model, optimizer, ema)
    for x, y in batches(4):  # mid-epoch and mid-cadence
        run(x, y)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "ema", nnx.state(ema))
    checkpointer.wait_until_finished()
    abstract = nnx.eval_shape(lambda: Ema(NnxNet(nnx.Rngs(0)), EMA))
    graphdef, target = nnx.split(abstract)
    restored = nnx.merge(graphdef, checkpointer.restore(tmp_path / "ema", target))
    assert isinstance(restored, Ema) and restored.transform == EMA
    assert int(restored.ema_state.step) == 4
    assert_trees_equal(nnx.state(restored), nnx.state(ema))
    checkpointer.close()


def test_resuming_gives_the_ema_of_the_run_that_never_stopped(tmp_path):
    data = batches(10)
    model, optimizer, ema = nnx_setup()
    run = nnx_jit_runner(model, optimizer, ema)
    for x, y in data:
        run(x, y)
    # The same run, stopped after step 4 and restored into abstract objects.
    model, optimizer, ema = nnx_setup()
    run = nnx_jit_runner(model, optimizer, ema)
    for x, y in data[:4]:
        run(x, y)
    with ocp.CheckpointManager(tmp_path) as manager:
        manager.save(4, args=ocp.args.StandardSave(nnx.state((model, optimizer, ema))))
        manager.wait_until_finished()
        graphdef, target = nnx.split(nnx.eval_shape(nnx_setup))
        state = manager.restore(4, args=ocp.args.StandardRestore(target))
    model2, optimizer2, ema2 = nnx.merge(graphdef, state)
    run = nnx_jit_runner(model2, optimizer2, ema2)
    for x, y in data[4:]:
        run(x, y)
    assert int(ema2.ema_state.step) == 10
    full_model, full_optimizer, full_ema = nnx_setup()
    run = nnx_jit_runner(full_model, full_optimizer, full_ema)
    for x, y in data:
        run(x, y)
    assert_trees_equal(nnx.state(ema2), nnx.state(full_ema))
    assert_trees_equal(nnx.state(model2, NOT_RNG), nnx.state(full_model, NOT_RNG))


# ------------------------------------------------------------------ bad input


class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(x)


def _model():
    return NnxNet(nnx.Rngs(0))


BAD_CONSTRUCTION = {
    "model_a_dict": (lambda: Ema({"w": jnp.ones(3)}, EMA), TypeError, "model must be an NNX"),
    "model_a_linen_module": (lambda: Ema(LinenNet(), EMA), TypeError, "model must be an NNX"),
    "arguments_swapped": (lambda: Ema(EMA, _model()), TypeError, r"order is Ema\(model, ema\)"),
    "ema_a_decay": (lambda: Ema(_model(), 0.999), TypeError, "schedules.constant"),
    "ema_an_optax_transform": (lambda: Ema(_model(), optax.sgd(0.1)), TypeError, "ema must be"),
    "ema_an_nnx_ema": (
        lambda: Ema(_model(), nnx.EMA(_model(), 0.9, only=nnx.Param)),
        TypeError,
        "ema must be",
    ),
    "only_not_a_filter": (lambda: Ema(_model(), EMA, only=3.5), TypeError, "only must be"),
    "only_selects_nothing": (
        lambda: Ema(_model(), EMA, only=nnx.Nothing),
        ValueError,
        "only=.* selects no variable",
    ),
    "only_selects_rng_state": (
        lambda: Ema(_model(), EMA, only=nnx.RngState),
        ValueError,
        "RNG state is never averaged",
    ),
}


@pytest.mark.bad_input
@pytest.mark.parametrize("case", sorted(BAD_CONSTRUCTION))
def test_bad_construction_raises_a_clear_error(case):
    make, error, match = BAD_CONSTRUCTION[case]
    with pytest.raises(error, match=match):
        make()


class Renamed(nnx.Module):
    def __init__(self, rngs):
        self.first = nnx.Linear(5, 8, rngs=rngs)


BAD_MODELS = {
    "wider": (
        lambda: NnxNet(nnx.Rngs(0), width=16),
        r"bn\.bias has shape \(16,\) in the model but \(8,\) in the EMA",
    ),
    "other_structure": (
        lambda: Renamed(nnx.Rngs(0)),
        r"the EMA's leaf bn\.bias is not in the model",
    ),
    "bf16_for_an_int_counter": (
        lambda: _with_float_calls(),
        r"calls has dtype float32 in the model but int32 in the EMA",
    ),
}


def _with_float_calls():
    model = NnxNet(nnx.Rngs(0))
    model.calls = nnx.Variable(jnp.zeros((), jnp.float32))
    return model


@pytest.mark.bad_input
@pytest.mark.parametrize("method", ["update", "apply_to"])
@pytest.mark.parametrize("case", sorted(BAD_MODELS))
def test_a_model_that_does_not_match_names_the_first_differing_path(method, case):
    ema = Ema(_model(), EMA)
    make, match = BAD_MODELS[case]
    with pytest.raises(ValueError, match=f"Ema.{method}: model does not match.*{match}"):
        getattr(ema, method)(make())


@pytest.mark.bad_input
def test_a_mismatch_under_nnx_jit_raises_the_same_error_before_tracing_the_math():
    ema = Ema(_model(), EMA)
    update = nnx.jit(lambda ema, model: ema.update(model))
    with pytest.raises(ValueError, match=r"bn\.bias has shape \(16,\) in the model"):
        update(ema, NnxNet(nnx.Rngs(0), width=16))
    assert int(ema.ema_state.step) == 0


@pytest.mark.bad_input
@pytest.mark.parametrize("method", ["update", "apply_to"])
def test_a_model_that_is_not_an_nnx_object_is_refused(method):
    ema = Ema(_model(), EMA)
    with pytest.raises(TypeError, match=f"Ema.{method}: model must be an NNX object"):
        getattr(ema, method)(nnx.state(_model()))


def test_counters_are_a_type_of_their_own():
    ema = Ema(_model(), EMA)
    assert type(ema.step) is EmaCount and type(ema.nonfinite_updates) is EmaCount
    assert nnx.to_flat_state(nnx.state(ema, nnx.Param))  # the EMA's params
    assert not [p for p, _ in nnx.to_flat_state(nnx.state(ema, nnx.Param)) if p[0] != "params"]

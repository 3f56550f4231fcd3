"""Orbax checkpoints of `EmaTrainState`: round trip, resume, old checkpoints, best, errors."""

from __future__ import annotations

import logging
import re
import shutil
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax.training import train_state
from support import assert_trees_equal
from support.models import EMA
from support.models import BnNet
from support.models import Mlp
from support.models import batches
from support.models import make_state
from support.models import train_step

import ema_jax

MODELS = pytest.mark.parametrize("model", [Mlp(), BnNet()], ids=["plain", "batchnorm"])
STEP = jax.jit(train_step, donate_argnums=0)


def manager(directory: Any, **options: Any) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        directory,
        item_handlers=ocp.StandardCheckpointHandler(),
        options=ocp.CheckpointManagerOptions(**options),
    )


def save(directory: Any, state: Any) -> None:
    with manager(directory) as m:
        m.save(int(state.step), args=ocp.args.StandardSave(state))


def train(state: Any, data: list) -> Any:
    for x, y in data:
        state, _ = STEP(state, x, y)
    return state


@MODELS
def test_round_trip_is_bit_identical(model, tmp_path):
    state = train(make_state(model, EMA), batches(5))
    save(tmp_path, state)
    with manager(tmp_path) as m:
        restored = ema_jax.restore_checkpoint(m, make_state(model, EMA, seed=1))
    assert_trees_equal(restored, state)
    assert restored.ema is EMA and restored.apply_fn == state.apply_fn


@MODELS
def test_resume_gives_the_run_that_never_stopped(model, tmp_path):
    data = batches(10)
    straight = train(make_state(model, EMA), data)
    first = train(make_state(model, EMA), data[:5])  # stops mid-epoch, mid-cadence
    save(tmp_path, first)
    with manager(tmp_path) as m:
        resumed = ema_jax.restore_checkpoint(m, make_state(model, EMA, seed=1))
    resumed = train(resumed, data[5:])
    assert int(resumed.ema_state.step) == int(resumed.step) == 10
    assert_trees_equal(resumed, straight)


class PlainBnState(train_state.TrainState):
    """A plain flax TrainState that carries BatchNorm statistics, as users write it."""

    batch_stats: Any = None


def plain_state(model: nn.Module) -> train_state.TrainState:
    variables = model.init(jax.random.key(0), jnp.ones((4, 5)))
    cls = PlainBnState if "batch_stats" in variables else train_state.TrainState
    extra = {"batch_stats": variables["batch_stats"]} if "batch_stats" in variables else {}
    return cls.create(
        apply_fn=model.apply,
        params=variables["params"],
        tx=optax.sgd(0.1, momentum=0.9),
        **extra,
    )


@jax.jit
def plain_step(state: train_state.TrainState, x: jax.Array, y: jax.Array) -> Any:
    """``train_step`` for a flax TrainState without an EMA."""
    stats = getattr(state, "batch_stats", None)

    def loss_fn(params):
        if stats is None:
            return jnp.mean((state.apply_fn({"params": params}, x) - y) ** 2), None
        variables = {"params": params, "batch_stats": stats}
        out, updates = state.apply_fn(variables, x, train=True, mutable=["batch_stats"])
        return jnp.mean((out - y) ** 2), updates["batch_stats"]

    grads, new_stats = jax.grad(loss_fn, has_aux=True)(state.params)
    new = state.apply_gradients(grads=grads)
    return new if stats is None else new.replace(batch_stats=new_stats)


@MODELS
def test_plain_train_state_checkpoint_starts_the_ema_from_its_weights(model, tmp_path, caplog):
    data = batches(7)
    old = plain_state(model)
    for x, y in data[:4]:
        old = plain_step(old, x, y)
    save(tmp_path, old)
    target = make_state(model, EMA, seed=1)
    with manager(tmp_path) as m, caplog.at_level(logging.WARNING, logger="ema_jax"):
        state = ema_jax.restore_checkpoint(m, target)
    assert "has no EMA" in caplog.text and "EMA starts from its raw weights" in caplog.text
    assert [r.name for r in caplog.records] == ["ema_jax"]
    assert_trees_equal(state.params, old.params)
    assert_trees_equal(state.opt_state, old.opt_state)
    assert_trees_equal(state.batch_stats, getattr(old, "batch_stats", None))
    assert_trees_equal(state.ema_params, old.params)
    assert_trees_equal(state.ema_batch_stats, getattr(old, "batch_stats", None))
    assert int(state.step) == int(state.ema_state.step) == 4
    assert int(state.ema_state.nonfinite_updates) == 0

    # The structure, dtypes and shardings of a fresh state: one compilation for the
    # rest of the run, and the EMA continues the cadence from step 4 as the
    # transform would.
    assert jax.tree.structure(state) == jax.tree.structure(target)
    assert [jax.typeof(a) for a in jax.tree.leaves(state)] == [
        jax.typeof(a) for a in jax.tree.leaves(target)
    ]
    step = jax.jit(lambda s, x, y: train_step(s, x, y))
    reference = EMA.init(_raw(old))._replace(step=jnp.asarray(4, jnp.int32))
    for x, y in data[4:]:
        state, _ = step(state, x, y)
        reference = EMA.update(_raw(state), reference)
    assert step._cache_size() == 1
    assert_trees_equal(state.ema_state, reference)


def _raw(state: train_state.TrainState) -> dict[str, Any]:
    """The raw variables the EMA averages: params, and batch_stats when there are any."""
    raw = {"params": state.params}
    if getattr(state, "batch_stats", None) is not None:
        raw["batch_stats"] = state.batch_stats
    return raw


def single_device() -> jax.sharding.Sharding:
    return jax.sharding.SingleDeviceSharding(jax.devices()[0])


def named() -> jax.sharding.Sharding:
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


@pytest.mark.parametrize("sharding", [single_device, named])
@pytest.mark.parametrize("written_by", ["EmaTrainState", "TrainState"])
def test_abstract_restore_puts_every_leaf_on_its_sharding(sharding, written_by, tmp_path):
    sharding = sharding()
    if written_by == "EmaTrainState":
        state = train(make_state(BnNet(), EMA), batches(4))
        save(tmp_path, state)
    else:
        state = plain_state(BnNet())
        for x, y in batches(4):
            state = plain_step(state, x, y)
        save(tmp_path, state)
    abstract = jax.eval_shape(lambda: make_state(BnNet(), EMA))
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract
    )
    with manager(tmp_path) as m:
        restored = ema_jax.restore_checkpoint(m, abstract)
    assert jax.tree.structure(restored) == jax.tree.structure(abstract)
    for leaf in jax.tree.leaves(restored):
        assert isinstance(leaf, jax.Array)
        assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim)
    assert_trees_equal(restored.params, state.params)
    assert int(restored.ema_state.step) == 4


def test_only_finalized_checkpoints_are_restored(tmp_path):
    state = train(make_state(Mlp(), EMA), batches(2))
    save(tmp_path, state)
    # What an interrupted save of step 9 leaves behind: orbax's temporary directory.
    shutil.copytree(tmp_path / "2", tmp_path / "9.orbax-checkpoint-tmp-1234567")
    with manager(tmp_path) as m:
        assert list(m.all_steps()) == [2]
        restored = ema_jax.restore_checkpoint(m, make_state(Mlp(), EMA, seed=1))
    assert int(restored.step) == 2


def test_restore_takes_a_given_step(tmp_path):
    state = make_state(Mlp(), EMA)
    with manager(tmp_path) as m:
        for x, y in batches(3):
            state, _ = STEP(state, x, y)
            m.save(int(state.step), args=ocp.args.StandardSave(state))
        m.wait_until_finished()
        older = ema_jax.restore_checkpoint(m, make_state(Mlp(), EMA), step=2)
        latest = ema_jax.restore_checkpoint(m, make_state(Mlp(), EMA))
    assert (int(older.step), int(latest.step)) == (2, 3)


def scores(acc: float, ema_acc: float) -> dict[str, float]:
    return {"accuracy": acc, "ema_accuracy": ema_acc}


def test_best_checkpoints_keep_the_best_raw_and_the_best_ema_weights(tmp_path):
    state = make_state(BnNet(), EMA)
    metrics = [scores(0.5, 0.4), scores(0.9, 0.6), scores(0.7, 0.95), scores(0.8, 0.9)]
    kept = {}
    with ema_jax.BestCheckpoints(tmp_path) as best:
        for step, ((x, y), m) in enumerate(zip(batches(4), metrics, strict=True)):
            state, _ = STEP(state, x, y)
            best.save(step, state, m)
            kept[step] = jax.device_get((_raw(state), state.ema_variables()))
        best.wait_until_finished()
        assert (best.best_step("raw"), best.best_step("ema")) == (1, 2)
        assert best.best_metrics("ema") == metrics[2]
        raw = best.restore("raw", make_state(BnNet(), EMA, seed=1))
        ema = best.restore("ema", make_state(BnNet(), EMA, seed=1))
    assert_trees_equal(raw, kept[1][0])
    assert_trees_equal(ema, kept[2][1])
    assert sorted(p.name for p in (tmp_path / "raw").iterdir() if p.name.isdigit()) == ["1"]

    # Reopened, e.g. on resume: the ranking goes on; a repeated step is a no-op.
    with ema_jax.BestCheckpoints(tmp_path) as best:
        best.save(3, state, scores(0.0, 0.0))
        best.save(4, state, scores(0.1, 0.99))
        best.wait_until_finished()
        assert (best.best_step("raw"), best.best_step("ema")) == (1, 4)


def test_best_checkpoints_by_an_error_to_minimize(tmp_path):
    state = make_state(Mlp(), EMA)
    with ema_jax.BestCheckpoints(tmp_path, raw_metric="err", ema_metric="ema_err", mode="min") as b:
        for step, (err, ema_err) in enumerate([(0.3, 0.2), (0.1, float("nan")), (0.2, 0.3)]):
            b.save(step, state, {"err": err, "ema_err": ema_err})
        b.wait_until_finished()
        assert (b.best_step("raw"), b.best_step("ema")) == (1, 0)


@pytest.mark.bad_input
def test_missing_checkpoint_names_the_directory(tmp_path):
    target = make_state(Mlp(), EMA)
    missing = pytest.raises(
        FileNotFoundError, match=re.escape(f"no finalized checkpoint in {tmp_path}")
    )
    with manager(tmp_path) as m, missing:
        ema_jax.restore_checkpoint(m, target)
    save(tmp_path, target)
    missing = pytest.raises(FileNotFoundError, match=r"for step 7 in .*it has steps \[0\]")
    with manager(tmp_path) as m, missing:
        ema_jax.restore_checkpoint(m, target, step=7)
    missing = pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "best" / "ema")))
    with ema_jax.BestCheckpoints(tmp_path / "best") as best, missing:
        best.restore("ema", target)


def wider_mlp() -> ema_jax.EmaTrainState:
    """The Mlp on 6 input features instead of 5: same leaves, one other shape."""
    model = Mlp()
    params = model.init(jax.random.key(0), jnp.ones((4, 6)))["params"]
    return ema_jax.EmaTrainState.create(
        apply_fn=model.apply, params=params, tx=optax.sgd(0.1, momentum=0.9), ema=EMA
    )


@pytest.mark.parametrize(
    ("saved", "target", "text"),
    [
        (
            lambda: make_state(BnNet(), EMA),
            lambda: make_state(Mlp(), EMA),
            "params.Dense_0.bias has shape (8,) in the checkpoint but (3,) in the target",
        ),
        (
            lambda: make_state(Mlp(), EMA),
            lambda: make_state(BnNet(), EMA),
            "the target's leaf params.BatchNorm_0.bias is not in the checkpoint",
        ),
        (
            lambda: make_state(Mlp(), EMA),
            wider_mlp,
            "params.Dense_1.kernel has shape (5, 8) in the checkpoint but (6, 8) in the target",
        ),
        (
            lambda: plain_state(Mlp()),
            wider_mlp,
            "params.Dense_1.kernel has shape (5, 8) in the checkpoint but (6, 8) in the target",
        ),
        (
            lambda: plain_state(BnNet()),
            lambda: make_state(BnNet(), EMA).replace(batch_stats=None),
            "the checkpoint's leaf batch_stats.BatchNorm_0.mean is not in the target",
        ),
    ],
    ids=["other-layers", "no-batchnorm", "other-shape", "plain-other-shape", "plain-extra"],
)
@pytest.mark.bad_input
def test_checkpoint_of_another_model_names_the_first_differing_leaf(saved, target, text, tmp_path):
    save(tmp_path, saved())
    with manager(tmp_path) as m, pytest.raises(ValueError, match=re.escape(text)):
        ema_jax.restore_checkpoint(m, target())


@pytest.mark.bad_input
def test_best_checkpoints_of_another_model_raise(tmp_path):
    with ema_jax.BestCheckpoints(tmp_path) as best:
        best.save(0, make_state(Mlp(), EMA), scores(0.5, 0.5))
        with pytest.raises(ValueError, match=re.escape("params.Dense_1.kernel has shape")):
            best.restore("raw", wider_mlp())


@pytest.mark.bad_input
def test_manager_without_a_handler_is_told_how_to_make_one(tmp_path):
    save(tmp_path, make_state(Mlp(), EMA))
    with (
        ocp.CheckpointManager(tmp_path) as m,
        pytest.raises(ValueError, match=re.escape("item_handlers=ocp.StandardCheckpointHandler()")),
    ):
        ema_jax.restore_checkpoint(m, make_state(Mlp(), EMA))


def open_best(directory: Any, call: Any, **kwargs: Any) -> None:
    with ema_jax.BestCheckpoints(directory, **kwargs) as best:
        call(best)


@pytest.mark.parametrize(
    ("call", "error", "text"),
    [
        (
            lambda d: open_best(d, print, mode="best"),
            ValueError,
            "mode must be 'max' or 'min', got 'best'",
        ),
        (
            lambda d: open_best(d, print, ema_metric=""),
            ValueError,
            "ema_metric must be a non-empty string, got ''",
        ),
        (
            lambda d: open_best(d, lambda b: b.save(0, make_state(Mlp(), EMA), {"accuracy": 1})),
            ValueError,
            "metrics must have 'ema_accuracy', got keys ['accuracy']",
        ),
        (
            lambda d: open_best(d, lambda b: b.save(0, make_state(Mlp(), EMA), scores(1, "high"))),
            ValueError,
            "metrics['ema_accuracy'] must be a number, got 'high'",
        ),
        (
            lambda d: open_best(d, lambda b: b.best_step("both")),
            ValueError,
            "which must be 'raw' or 'ema', got 'both'",
        ),
        (
            lambda d: ema_jax.restore_checkpoint(None, plain_state(Mlp())),
            TypeError,
            "target must be an ema_jax.EmaTrainState, got TrainState",
        ),
        (
            lambda d: open_best(d, lambda b: b.restore("ema", {"params": {}})),
            TypeError,
            "target must be an ema_jax.EmaTrainState (concrete or from jax.eval_shape), got dict",
        ),
        (
            lambda d: open_best(d, lambda b: b.save(0, {"params": {}}, scores(1, 1))),
            TypeError,
            "state must be an ema_jax.EmaTrainState, got dict",
        ),
    ],
    ids=[
        "mode",
        "metric-name",
        "metric-missing",
        "metric-not-a-number",
        "which",
        "target",
        "best-restore-target",
        "best-save-state",
    ],
)
@pytest.mark.bad_input
def test_bad_arguments_are_named(call, error, text, tmp_path):
    with pytest.raises(error, match=re.escape(text)):
        call(tmp_path)

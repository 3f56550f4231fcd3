"""`ema_jax.bema`: TRL's BEMACallback step for step, in every place an EMA goes.

The reference is ``anchors.trl_bema``, TRL's callback transcribed into float64 NumPy.
Parity is checked in float64 (``jax.enable_x64``) to 1e-9 of the trajectory's scale:
the two compute the same expressions in another order (a lerp for the EMA), so they
differ by a few float64 ulps per update; 1e-9 leaves room for nothing else.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from support import anchors
from support import fp32_tolerance
from support import run_every_call
from support.models import Mlp
from support.models import NnxNet
from support.models import batches
from support.models import make_state
from support.models import train_step

import ema_jax
from ema_jax._bema import BemaSchedule
from ema_jax._bema import BemaState

from conftest import make_trajectory

CONFIGS = {
    "every_step": dict(update_period=1),
    "burn_in_and_period": dict(
        update_period=5,
        update_after=17,
        ema_power=0.6,
        bias_power=0.3,
        lag=4,
        multiplier=2.0,
        min_ema_multiplier=0.05,
    ),
}


def trl_config(config: dict) -> dict:
    """Our arguments under TRL's names (``update_period`` is its ``update_freq``)."""
    out = dict(config)
    out["update_freq"] = out.pop("update_period")
    return out


def float_leaves(tree: dict) -> dict:
    return {k: v for k, v in tree.items() if k != "count"}  # TRL averages parameters only


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_bema_is_trl_bema_callback_step_for_step_in_float64(config):
    trajectory = make_trajectory(120, dtype=np.float64)
    theirs = anchors.trl_bema([float_leaves(t) for t in trajectory], **trl_config(config))
    with jax.enable_x64(True):
        ours = run_every_call(ema_jax.bema(**config), trajectory)
    scale = max(float(np.max(np.abs(t["w"]))) for t in trajectory)
    changed = 0
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        for name in ("w", "b"):
            assert a[name].dtype == np.float64
            np.testing.assert_allclose(a[name], b[name], rtol=0, atol=1e-9 * scale, err_msg=f"{i}")
        changed += not np.array_equal(b["w"], theirs[i - 1]["w"]) if i else 0
    assert changed >= 20  # the comparison saw many updates, not a frozen output


def test_bema_in_float32_is_trl_to_rounding():
    config = CONFIGS["burn_in_and_period"]
    trajectory = make_trajectory(120)
    theirs = anchors.trl_bema([float_leaves(t) for t in trajectory], **trl_config(config))
    ours = run_every_call(ema_jax.bema(**config), trajectory)
    for a, b in zip(ours, theirs, strict=True):
        for name in ("w", "b"):
            np.testing.assert_allclose(a[name], b[name], rtol=0, atol=fp32_tolerance(trajectory))


def test_the_output_stays_the_initial_weights_until_the_first_update():
    trajectory = make_trajectory(30)
    ours = run_every_call(ema_jax.bema(update_period=5, update_after=10), trajectory)
    for i in range(14):  # calls 0..13 are global steps 1..14; the first update is at 15
        np.testing.assert_array_equal(ours[i]["w"], trajectory[0]["w"])
    assert not np.array_equal(ours[14]["w"], trajectory[0]["w"])


def test_schedule_values_are_trls_formulas():
    s = BemaSchedule(update_period=3, update_after=4, lag=10, multiplier=1.0)
    # Snapshot at global step 4 (call 3), updates at 7, 10, ... (calls 6, 9, ...).
    assert [s.alpha_at(i) is not None for i in range(10)] == [
        False, False, False, True, False, False, True, False, False, True
    ]  # fmt: skip
    assert s.alpha_at(3) == 1.0 and s.bias_at(3) is None  # the snapshot copies
    assert s.alpha_at(6) == pytest.approx(17**-0.5, rel=1e-15)
    assert s.bias_at(6) == pytest.approx(17**-0.2, rel=1e-15)
    floor = BemaSchedule(update_period=1, min_ema_multiplier=0.2)
    assert floor.alpha_at(1000) == 0.2


def test_non_finite_parameters_leave_the_output_and_the_mean_as_they_were():
    b = ema_jax.bema(update_period=1)
    state = b.init({"w": jnp.zeros(3)})
    state = b.update({"w": jnp.ones(3)}, state)
    before = state
    state = b.update({"w": jnp.array([1.0, jnp.nan, jnp.inf])}, state)
    assert np.isfinite(state.ema["w"]).all() and np.isfinite(state.mean["w"]).all()
    np.testing.assert_array_equal(state.ema["w"][1:], before.ema["w"][1:])
    assert state.ema["w"][0] != before.ema["w"][0]


def test_nan_at_the_snapshot_does_not_poison_theta0():
    b = ema_jax.bema(update_period=1, update_after=2)
    state = b.init({"w": jnp.zeros(2)})
    state = b.update({"w": jnp.ones(2)}, state)
    state = b.update({"w": jnp.array([2.0, jnp.nan])}, state)  # global step 2: snapshot
    np.testing.assert_array_equal(state.theta0["w"], [2.0, 0.0])


def test_settings_name_every_hyperparameter():
    settings = ema_jax.bema(update_after=3, ema_dtype="float32").settings()
    assert settings["schedule"] == {
        "name": "bema",
        "update_period": 400,
        "ema_power": 0.5,
        "bias_power": 0.2,
        "lag": 10,
        "update_after": 3,
        "multiplier": 1.0,
        "min_ema_multiplier": 0.0,
    }
    assert settings["ema_dtype"] == "float32" and settings["nonfinite"] == "skip"


def test_explain_reports_the_ema_step_size():
    b = ema_jax.bema(update_period=1)
    report = b.explain(total_steps=400)
    assert report.schedule == "bema" and report.settings == b.schedule.settings()
    assert report.alpha_end == pytest.approx((10 + 400) ** -0.5, rel=1e-12)  # call 399, t=400
    for step, alpha, *_ in report.curve:
        assert alpha == pytest.approx((10 + step + 1) ** -0.5, rel=1e-12)


def test_explain_counts_updates_on_bemas_own_cadence():
    # update_after=17, period 5: TRL updates at global steps 17, 22, ... (calls 16, 21, ...)
    b = ema_jax.bema(update_period=5, update_after=17)
    report = ema_jax.explain(b, total_steps=1000)
    calls = [i for i in range(1000) if b.schedule.alpha_at(i) is not None]
    assert calls[:2] == [16, 21] and report.updates_total == len(calls) == 197
    assert report.copy_updates == 1  # the snapshot at update_after
    assert report.alpha_end == pytest.approx(b.schedule.alpha_at(calls[-1]), rel=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"update_period": 0}, "update_period must be"),
        ({"ema_power": -1.0}, "ema_power must be"),
        ({"bias_power": float("nan")}, "bias_power must be"),
        ({"lag": -1}, "lag must be"),
        ({"update_after": -2}, "update_after must be"),
        ({"multiplier": 0.0}, "multiplier must be"),
        ({"min_ema_multiplier": 1.5}, "min_ema_multiplier must be"),
        ({"nonfinite": "ignore"}, "nonfinite must be"),
        ({"ema_dtype": "int32"}, "ema_dtype must be"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ema_jax.bema(**kwargs)


def test_update_refuses_another_state():
    b = ema_jax.bema()
    with pytest.raises(TypeError, match="BemaState"):
        b.update({"w": jnp.zeros(2)}, ema_jax.ema(ema_jax.schedules.constant(0.9)).init({}))


# ------------------------------------------------------------- where an EMA goes


def test_ema_train_state_runs_bema_as_the_transform_alone():
    b = ema_jax.bema(update_period=2, update_after=3)
    state = make_state(Mlp(), b)
    assert isinstance(state.ema_state, BemaState)
    alone = b.init({"params": state.params})
    step = jax.jit(train_step, donate_argnums=0)
    for x, y in batches(9):
        state, _ = step(state, x, y)
        alone = b.update({"params": state.params}, alone)
    jax.tree.map(np.testing.assert_array_equal, state.ema_params, alone.ema["params"])
    assert int(state.ema_state.step) == 9


def test_checkpoints_round_trip_and_refuse_other_bema_settings(tmp_path):
    b = ema_jax.bema(update_period=2, update_after=3)
    state = make_state(Mlp(), b)
    step = jax.jit(train_step, donate_argnums=0)
    for x, y in batches(6):
        state, _ = step(state, x, y)
    options = ocp.CheckpointManagerOptions()
    handler = ocp.StandardCheckpointHandler()
    with ocp.CheckpointManager(tmp_path, item_handlers=handler, options=options) as m:
        ema_jax.save_checkpoint(m, state)
        m.wait_until_finished()
    with ocp.CheckpointManager(tmp_path, item_handlers=handler, options=options) as m:
        restored = ema_jax.restore_checkpoint(m, make_state(Mlp(), b, seed=1))
        jax.tree.map(np.testing.assert_array_equal, restored.ema_state, state.ema_state)
        other = ema_jax.bema(update_period=2, update_after=4)
        with pytest.raises(ema_jax.EmaSettingsMismatchError, match="update_after is 3"):
            ema_jax.restore_checkpoint(m, make_state(Mlp(), other, seed=1))


def test_nnx_ema_runs_bema_as_the_transform_alone():
    b = ema_jax.bema(update_period=2, update_after=1)
    model = NnxNet(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.sgd(0.1, momentum=0.9), wrt=nnx.Param)
    ema = ema_jax.nnx.Ema(model, b, only=nnx.Param)
    alone = b.init(nnx.as_pure(nnx.state(model, nnx.Param)))

    @nnx.jit(donate_argnums=(0, 1, 2))
    def train(model, optimizer, ema, x, y):
        grads = nnx.grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
        optimizer.update(model, grads)
        ema.update(model)

    for x, y in batches(7):
        train(model, optimizer, ema, x, y)
        alone = b.update(nnx.as_pure(nnx.state(model, nnx.Param)), alone)
    got = ema.ema_state
    assert isinstance(got, BemaState)
    for field in ("ema", "mean", "theta0"):
        jax.tree.map(np.testing.assert_array_equal, getattr(got, field), getattr(alone, field))
    # The buffers are in nnx.state(ema), so an NNX checkpoint of the EMA holds them.
    names = {str(path[0]) for path, _ in nnx.to_flat_state(nnx.state(ema))}
    assert {"params", "buffers"} <= names


def test_donated_update_aliases_every_buffer_and_compiles_once():
    b = ema_jax.bema(update_period=3, update_after=2)
    params = {"w": jnp.ones((64, 64)), "b": jnp.zeros(64)}
    state = b.init(params)
    update = jax.jit(b.update, donate_argnums=1)
    memory = update.lower(params, state).compile().memory_analysis()
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
    assert memory.alias_size_in_bytes == state_bytes  # written in place, all five fields
    for i in range(7):
        state = update(jax.tree.map(lambda x, i=i: x + i, params), state)
    assert update._cache_size() == 1 and int(state.step) == 7


def test_bf16_parameters_with_a_float32_ema_keep_every_buffer_in_float32():
    b = ema_jax.bema(update_period=1, ema_dtype=jnp.float32)
    params = {"w": jnp.linspace(0, 1, 8, dtype=jnp.bfloat16), "n": jnp.zeros((), jnp.int32)}
    state = b.init(params)
    state = jax.jit(b.update)(jax.tree.map(lambda x: x + 1, params), state)
    for field in ("ema", "mean", "theta0"):
        assert getattr(state, field)["w"].dtype == jnp.float32
        assert getattr(state, field)["n"].dtype == jnp.int32
    assert int(state.ema["n"]) == 1  # integer leaves are copied at an update, as in ema()
    # t = 1: beta = 11**-0.5, alpha = 11**-0.2; the output is mean + alpha * (p - theta0).
    p0 = np.asarray(params["w"], np.float64)
    p1 = np.asarray(params["w"] + 1, np.float64)  # rounded to bf16, as the model holds it
    mean = p0 + 11**-0.5 * (p1 - p0)
    np.testing.assert_allclose(state.ema["w"], mean + 11**-0.2 * (p1 - p0), rtol=0, atol=1e-6)

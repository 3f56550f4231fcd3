"""Verified NNX checkpoints: `ema_jax.nnx.save_checkpoint` / `restore_checkpoint`.

The guarantees of linen's (tests/test_checkpoint_integrity.py) for NNX objects:
damage, another schedule, another dtype, another number of averages and another
model are each refused by name, and nothing is written into the objects unless the
step passed; an intact checkpoint resumes bit for bit (an interrupted run's EMA is the
uninterrupted run's).
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from support import assert_trees_equal
from support.models import EMA
from support.models import PYCLS
from support.models import Mlp
from support.models import batches
from support.models import make_state
from support.models import nnx_setup
from support.models import nnx_train_step

import ema_jax
from ema_jax import nnx as ema_nnx

STEP = nnx.jit(nnx_train_step, donate_argnums=(0, 1, 2))


def manager(directory: Any) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(directory, item_handlers=ocp.StandardCheckpointHandler())


def objects(ema: Any = EMA, seed: int = 0, **model_kw: Any) -> dict[str, Any]:
    model, optimizer, average = nnx_setup(ema, seed, **model_kw)
    return {"model": model, "optimizer": optimizer, "ema": average}


def train(objs: dict[str, Any], data: list) -> None:
    for x, y in data:
        STEP(objs["model"], objs["optimizer"], objs["ema"], x, y)


def snapshot(objs: Any) -> Any:
    """Every variable of the objects as NumPy (RNG keys as their key data)."""

    def host(x: Any) -> np.ndarray:
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return np.array(jax.device_get(x))

    return jax.tree.map(host, nnx.to_pure_dict(nnx.state(objs)))


def ema_jax_records(caplog: Any) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "ema_jax"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, dict[int, Any]]:
    """Steps 2 and 4 of a run, and every variable saved at each."""
    directory = tmp_path_factory.mktemp("nnx")
    objs, states = objects(), {}
    data = batches(4)
    with manager(directory) as m:
        for step in (2, 4):
            train(objs, data[step - 2 : step])
            assert ema_nnx.save_checkpoint(m, step, objs, custom_metadata={"epoch": step})
            states[step] = snapshot(objs)
    return directory, states


@pytest.fixture
def copy(saved, tmp_path) -> tuple[Path, dict[int, Any]]:
    directory, states = saved
    shutil.copytree(directory, tmp_path / "ckpt")
    return tmp_path / "ckpt", states


def test_an_interrupted_run_resumes_to_the_uninterrupted_run_bit_for_bit(tmp_path):
    data = batches(8)
    whole = objects()
    train(whole, data)
    first = objects()
    train(first, data[:3])
    with manager(tmp_path) as m:
        ema_nnx.save_checkpoint(m, 3, first)
    resumed = objects(seed=1)  # other initial values, all overwritten
    with manager(tmp_path) as m:
        assert ema_nnx.restore_checkpoint(m, resumed) == 3
    assert_trees_equal(snapshot(resumed), snapshot(first))
    train(resumed, data[3:])
    assert_trees_equal(snapshot(resumed), snapshot(whole))
    assert int(resumed["ema"].ema_state.step) == 8


def test_an_abstract_target_is_filled_and_keeps_your_metadata(copy):
    directory, states = copy
    abstract = nnx.eval_shape(lambda: objects(seed=1))
    with manager(directory) as m:
        assert ema_nnx.restore_checkpoint(m, abstract, step=2) == 2
        assert m.item_metadata(2).custom_metadata["epoch"] == 2
    assert_trees_equal(snapshot(abstract), states[2])


def flip(directory: Path, step: int) -> None:
    """64 bytes flipped in the middle of the largest data file of the step's item."""
    files = list((directory / str(step) / "default" / "d").iterdir())
    path = max(files, key=lambda p: p.stat().st_size)
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 2 - 32, len(data) // 2 + 32):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.bad_input
def test_flipped_bytes_are_refused_and_the_newest_intact_step_restored(tmp_path, caplog, capfd):
    # Width 64: kernels above the 1 KiB that OCDBT stores inline in its tree nodes,
    # so that they sit in data files as a real model's arrays do.
    objs, states = objects(width=64), {}
    with manager(tmp_path) as m:
        for step in (2, 4):
            train(objs, batches(2))
            ema_nnx.save_checkpoint(m, step, objs)
            states[step] = snapshot(objs)
    flip(tmp_path, 4)
    objs = objects(seed=1, width=64)
    before = snapshot(objs)
    with manager(tmp_path) as m:
        with pytest.raises(ema_jax.CorruptCheckpointError) as raised:
            ema_nnx.restore_checkpoint(m, objs, step=4)
        assert_trees_equal(snapshot(objs), before)  # nothing written on failure
        with caplog.at_level(logging.WARNING, logger="ema_jax"):
            assert ema_nnx.restore_checkpoint(m, objs) == 2
    error = raised.value
    assert str(error).startswith(f"checkpoint step 4 in {tmp_path} is corrupt: ")
    assert error.step == 4 and "metadata" not in str(error)
    assert_trees_equal(snapshot(objs), states[2])
    records = ema_jax_records(caplog)
    assert len(records) == 1 and records[0].getMessage().startswith("skipped checkpoint step 4")
    err = capfd.readouterr().err
    assert "Event loop is closed" not in err and "Exception ignored" not in err, err[:2000]


def other(**override: Any) -> Any:
    return ema_jax.normalized_ema(**(PYCLS | override))


SETTINGS = {
    "another schedule": (
        lambda: objects(other(ema_alpha=2e-2)),
        "schedule.ema_alpha is 0.01 in the checkpoint but 0.02 in the target",
    ),
    "another ema_dtype": (
        lambda: objects(other(ema_dtype=jnp.bfloat16)),
        "ema_dtype is None in the checkpoint but 'bfloat16' in the target",
    ),
    "bf16 parameters under ema_dtype=None": (
        lambda: objects(param_dtype=jnp.bfloat16),
        "the averaged leaf ema.params.bn.bias is float32 in the checkpoint but bfloat16 in"
        " the target",
    ),
}


@pytest.mark.parametrize(("make", "text"), SETTINGS.values(), ids=SETTINGS.keys())
@pytest.mark.bad_input
def test_other_ema_settings_are_refused_by_name_unless_allowed(make, text, copy, caplog):
    directory, states = copy
    objs = make()
    with manager(directory) as m:
        with pytest.raises(ema_jax.EmaSettingsMismatchError, match=re.escape(text)):
            ema_nnx.restore_checkpoint(m, objs)
        with caplog.at_level(logging.WARNING, logger="ema_jax"):
            assert ema_nnx.restore_checkpoint(m, objs, allow_ema_change=True) == 4
    # The saved values, in the target's dtypes; the target's settings from now on.
    want = jax.tree.map(
        lambda x, ref: x.astype(ref.dtype), states[4]["ema"], snapshot(make())["ema"]
    )
    assert_trees_equal(snapshot(objs)["ema"], want)
    assert len(ema_jax_records(caplog)) == 1 and text in caplog.text


@pytest.mark.bad_input
def test_two_averages_are_not_restored_into_one_nor_one_into_two(tmp_path):
    two = ema_jax.ema((ema_jax.schedules.constant(0.99), ema_jax.schedules.constant(0.9)))
    with manager(tmp_path / "two") as m:
        ema_nnx.save_checkpoint(m, 1, objects(two))
    with manager(tmp_path / "one") as m:
        ema_nnx.save_checkpoint(m, 1, objects())
    cases = [("two", objects(), "2 average(s), but the target's has 1")]
    cases += [("one", objects(two), "1 average(s), but the target's has 2")]
    for name, objs, text in cases:
        for allow in (False, True):
            mismatch = pytest.raises(ema_jax.EmaSettingsMismatchError)
            with manager(tmp_path / name) as m, mismatch as raised:
                ema_nnx.restore_checkpoint(m, objs, allow_ema_change=allow)
            assert text in str(raised.value) and "strict" not in str(raised.value)


@pytest.mark.bad_input
def test_another_model_names_the_first_leaf_that_differs(copy):
    directory, _ = copy
    text = (
        "does not fit the objects: ema.params.bn.bias has shape (8,) in the checkpoint but"
        " (16,) in objects"
    )
    with manager(directory) as m, pytest.raises(ValueError, match=re.escape(text)):
        ema_nnx.restore_checkpoint(m, objects(width=16))
    with manager(directory) as m, pytest.raises(ValueError, match="objects' leaf extra"):
        ema_nnx.restore_checkpoint(m, objects() | {"extra": nnx.Linear(1, 1, rngs=nnx.Rngs(0))})


@pytest.mark.bad_input
def test_bad_arguments_are_named(tmp_path):
    with manager(tmp_path) as m:
        with pytest.raises(FileNotFoundError, match="no finalized checkpoint in"):
            ema_nnx.restore_checkpoint(m, objects())
        with pytest.raises(TypeError, match=r"objects must be NNX objects.*got nothing"):
            ema_nnx.save_checkpoint(m, 1, {})
        with pytest.raises(TypeError, match=r"objects must be NNX objects.*got float"):
            ema_nnx.save_checkpoint(m, 1, {"w": 1.0})
        with pytest.raises(ValueError, match="custom_metadata must not use the key 'ema_jax'"):
            ema_nnx.save_checkpoint(m, 1, objects(), custom_metadata={"ema_jax": 1})
        with pytest.raises(TypeError, match="allow_ema_change must be a bool"):
            ema_nnx.restore_checkpoint(m, objects(), allow_ema_change="yes")


@pytest.mark.bad_input
def test_a_manager_of_a_relative_directory_is_refused_with_the_fix(tmp_path, monkeypatch):
    # Issue 21: orbax refuses relative paths, which read as a corrupt checkpoint.
    monkeypatch.chdir(tmp_path)
    text = "the manager's directory 'rel' is relative, and orbax reads and writes absolute"
    with manager("rel") as m:
        for call in (
            lambda: ema_nnx.save_checkpoint(m, 1, objects()),
            lambda: ema_nnx.restore_checkpoint(m, objects()),
            lambda: ema_jax.save_checkpoint(m, make_state(Mlp(), EMA)),
            lambda: ema_jax.restore_checkpoint(m, make_state(Mlp(), EMA)),
        ):
            with pytest.raises(ValueError, match=re.escape(text)):
                call()


@pytest.mark.bad_input
def test_an_ema_alone_is_checked_as_well(tmp_path):
    # The objects may be one NNX object: its averaged leaves are then at the root.
    ema = nnx_setup()[2]
    with manager(tmp_path) as m:
        ema_nnx.save_checkpoint(m, 1, ema)
    low = nnx_setup(param_dtype=jnp.bfloat16)[2]
    text = "the averaged leaf params.bn.bias is float32 in the checkpoint but bfloat16"
    with manager(tmp_path) as m:
        with pytest.raises(ema_jax.EmaSettingsMismatchError, match=re.escape(text)):
            ema_nnx.restore_checkpoint(m, low)
        other = nnx_setup(seed=1)[2]
        assert ema_nnx.restore_checkpoint(m, other) == 1
    assert_trees_equal(snapshot(other), snapshot(ema))

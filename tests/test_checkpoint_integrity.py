"""Damaged checkpoints and changed EMA settings: nothing wrong is ever restored.

A checkpoint of steps 1 and 2 is written once with ``ema_jax.save_checkpoint``; each
test damages a copy of step 2 the way a disk or an interrupted copy does (64 bytes
flipped in the middle of the largest data file, that file cut to half, each kind of
file deleted) and restores it. An explicit ``step=2`` raises CorruptCheckpointError
naming the step, ``step=None`` falls back to step 1 with a warning naming step 2, and
whatever is returned equals, bit for bit, the state that was saved at its step.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from support import assert_trees_equal
from support.models import EMA
from support.models import PYCLS
from support.models import Mlp
from support.models import batches
from support.models import make_state
from support.models import train_step

import ema_jax

STEP = jax.jit(train_step)


class Wide(nn.Module):
    """Kernels of 10 KiB and 6 KiB: above the 1 KiB that orbax's OCDBT stores inline in
    its tree nodes, so they sit in data files as a large model's arrays do."""

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        del train
        return nn.Dense(3)(nn.relu(nn.Dense(512)(x)))


def manager(directory: Any) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(directory, item_handlers=ocp.StandardCheckpointHandler())


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, dict[int, Any]]:
    """A directory with steps 1 and 2 of the Wide model, and the states saved at each."""
    directory = tmp_path_factory.mktemp("pristine")
    state, states = make_state(Wide(), EMA), {}
    with manager(directory) as m:
        for x, y in batches(2):
            state, _ = STEP(state, x, y)
            ema_jax.save_checkpoint(m, state)
            states[int(state.step)] = jax.device_get(state)
    return directory, states


@pytest.fixture
def copy(saved, tmp_path) -> tuple[Path, dict[int, Any]]:
    directory, states = saved
    shutil.copytree(directory, tmp_path / "ckpt")
    return tmp_path / "ckpt", states


def target() -> ema_jax.EmaTrainState:
    return make_state(Wide(), EMA, seed=1)


def ema_jax_records(caplog: Any) -> list[logging.LogRecord]:
    """What ema_jax logged (orbax logs on its own, e.g. of a missing step metadata file)."""
    return [r for r in caplog.records if r.name == "ema_jax"]


def step_files(directory: Path, step: int) -> dict[str, Path]:
    """Every file of a step, by its path relative to the step's directory."""
    root = directory / str(step)
    return {str(p.relative_to(root)): p for p in sorted(root.rglob("*")) if p.is_file()}


def largest_data_file(directory: Path, step: int) -> Path:
    data = [p for p in step_files(directory, step).values() if p.parent.name == "d"]
    return max(data, key=lambda p: p.stat().st_size)


def flip(directory: Path) -> None:
    path = largest_data_file(directory, 2)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    for i in range(middle - 32, middle + 32):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(directory: Path) -> None:
    path = largest_data_file(directory, 2)
    os.truncate(path, path.stat().st_size // 2)


# Each kind of file orbax 0.12.8 writes into a step (data files named by their hash):
# deleting any of the first group loses arrays or their structure; the second group
# holds nothing a restore reads when the target gives every array's sharding (step
# metadata and metrics, commit markers, the sharding and array metadata, the
# per-process OCDBT manifest that the merged one supersedes): such a step restores
# whole, and its checksums prove it.
LOSES_DATA = [
    "default/_METADATA",
    "default/d/*",
    "default/manifest.ocdbt",
    "default/ocdbt.process_0/d/*",
]
REDUNDANT = [
    "_CHECKPOINT_METADATA",
    "commit_success.txt",
    "default/_sharding",
    "default/array_metadatas/process_0",
    "default/commit_success.txt",
    "default/ocdbt.process_0/manifest.ocdbt",
]


def delete(kind: str) -> Any:
    def damage(directory: Path) -> None:
        doomed = [p for rel, p in step_files(directory, 2).items() if fnmatch.fnmatch(rel, kind)]
        assert doomed, kind
        for path in doomed:
            path.unlink()

    return damage


CORRUPTIONS = {"flip": flip, "truncate": truncate} | {f"delete {k}": delete(k) for k in LOSES_DATA}


def test_the_file_kinds_are_the_ones_orbax_writes(saved):
    directory, _ = saved
    kinds = {re.sub(r"/d/[0-9a-f]+$", "/d/*", rel) for rel in step_files(directory, 2)}
    assert kinds == set(LOSES_DATA + REDUNDANT)


@pytest.mark.parametrize("damage", CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
@pytest.mark.bad_input
def test_a_damaged_step_is_never_restored(damage, copy, caplog, capfd):
    directory, states = copy
    damage(directory)
    with manager(directory) as m:
        with pytest.raises(ema_jax.CorruptCheckpointError) as raised:
            ema_jax.restore_checkpoint(m, target(), step=2)
        with caplog.at_level(logging.WARNING, logger="ema_jax"):
            restored = ema_jax.restore_checkpoint(m, target())
    error = raised.value
    assert type(error) is ema_jax.CorruptCheckpointError and isinstance(error, OSError)
    assert str(error).startswith(f"checkpoint step 2 in {directory} is corrupt: ")
    assert error.step == 2 and str(error.directory) == str(directory)
    if error.path is not None:  # the first bad array, named in the message
        assert error.path in str(error)
    assert_trees_equal(restored, states[1])
    assert len(ema_jax_records(caplog)) == 1
    assert (
        ema_jax_records(caplog)[0]
        .getMessage()
        .startswith("skipped checkpoint step 2: checkpoint step 2")
    )
    err = capfd.readouterr().err
    assert "Event loop is closed" not in err and "Exception ignored" not in err, err[:2000]


def test_orbax_alone_restores_a_flip_as_wrong_numbers(copy):
    # Why the checksums exist: no checksum covers the chunks orbax 0.12.8 writes.
    directory, states = copy
    flip(directory)
    with manager(directory) as m:
        restored = m.restore(2, args=ocp.args.StandardRestore(target()))
    pairs = zip(jax.tree.leaves(restored), jax.tree.leaves(states[2]), strict=True)
    assert not all(np.array_equal(a, b) for a, b in pairs)


def test_a_flipped_array_is_named(copy):
    directory, _ = copy
    flip(directory)
    with manager(directory) as m, pytest.raises(ema_jax.CorruptCheckpointError) as raised:
        ema_jax.restore_checkpoint(m, target(), step=2)
    assert raised.value.path is not None
    assert re.search(
        rf"{re.escape(raised.value.path)} reads back with crc32 [0-9a-f]{{8}}, but was saved"
        r" with [0-9a-f]{8}",
        str(raised.value),
    )


@pytest.mark.parametrize("kind", REDUNDANT)
@pytest.mark.bad_input
def test_a_step_without_a_file_it_does_not_need_restores_verified(kind, copy, caplog):
    directory, states = copy
    delete(kind)(directory)
    with manager(directory) as m, caplog.at_level(logging.WARNING, logger="ema_jax"):
        explicit = ema_jax.restore_checkpoint(m, target(), step=2)
        latest = ema_jax.restore_checkpoint(m, target())
    assert_trees_equal(explicit, states[2])
    assert_trees_equal(latest, states[2])
    assert ema_jax_records(caplog) == []


@pytest.mark.bad_input
def test_no_intact_step_raises_naming_the_newest(copy):
    directory, _ = copy
    flip(directory)
    shutil.rmtree(directory / "1" / "default" / "d")
    with manager(directory) as m, pytest.raises(ema_jax.CorruptCheckpointError) as raised:
        ema_jax.restore_checkpoint(m, target())
    assert str(raised.value).startswith(
        f"no intact checkpoint in {directory}: all 2 steps fail verification; the newest:"
        f" checkpoint step 2 in {directory} is corrupt: "
    )
    assert raised.value.step == 2


def test_an_intact_checkpoint_restores_bit_for_bit_and_silently(copy, caplog):
    directory, states = copy
    with manager(directory) as m, caplog.at_level(logging.WARNING, logger="ema_jax"):
        restored = ema_jax.restore_checkpoint(m, target())
    assert_trees_equal(restored, states[2])
    assert ema_jax_records(caplog) == []


def other_ema(**override: Any) -> ema_jax.NormalizedEma:
    settings = dict(PYCLS)
    return ema_jax.normalized_ema(**(settings | override))


CHANGES = {
    "ema_alpha": (
        other_ema(ema_alpha=2e-2),
        "schedule.ema_alpha is 0.01 in the checkpoint but 0.02",
    ),
    "update_period": (
        other_ema(update_period=4),
        "schedule.update_period is 2 in the checkpoint but 4",
    ),
    "warmup": (other_ema(warmup_epochs=0), "schedule.warmup_epochs is 1 in the checkpoint but 0"),
    "ema_dtype": (
        other_ema(ema_dtype=jnp.bfloat16),
        "ema_dtype is None in the checkpoint but 'bfloat16'",
    ),
}


@pytest.mark.parametrize(("ema", "text"), CHANGES.values(), ids=CHANGES.keys())
@pytest.mark.bad_input
def test_another_ema_setting_raises_unless_allowed(ema, text, copy, caplog):
    directory, states = copy
    with manager(directory) as m:
        with pytest.raises(ema_jax.EmaSettingsMismatchError) as raised:
            ema_jax.restore_checkpoint(m, make_state(Wide(), ema, seed=1))
        with caplog.at_level(logging.WARNING, logger="ema_jax"):
            restored = ema_jax.restore_checkpoint(
                m, make_state(Wide(), ema, seed=1), allow_ema_change=True
            )
    message = str(raised.value)
    assert type(raised.value) is ema_jax.EmaSettingsMismatchError
    assert isinstance(raised.value, ValueError)
    assert message.startswith(f"checkpoint step 2 in {directory} holds an EMA with other settings")
    assert text in message and "pass allow_ema_change=True" in message
    # Kept: the saved values, in the target's dtype; the new settings from now on.
    saved = states[2]
    assert restored.ema is ema
    assert_trees_equal(restored.replace(ema_state=saved.ema_state), saved)
    want = jax.tree.map(
        lambda x, t: np.asarray(x).astype(t.dtype),
        saved.ema_state,
        make_state(Wide(), ema).ema_state,
    )
    assert_trees_equal(restored.ema_state, want)
    assert len(ema_jax_records(caplog)) == 1
    assert "the EMA's settings change" in caplog.text and text in caplog.text


def test_an_fp32_ema_is_not_silently_downcast(tmp_path):
    fp32 = other_ema(ema_dtype=jnp.float32)
    with manager(tmp_path) as m:
        ema_jax.save_checkpoint(m, make_state(Wide(), fp32))
    raises = pytest.raises(
        ema_jax.EmaSettingsMismatchError,
        match=re.escape("ema_dtype is 'float32' in the checkpoint but 'bfloat16' in the target"),
    )
    with manager(tmp_path) as m, raises:
        ema_jax.restore_checkpoint(m, make_state(Wide(), other_ema(ema_dtype=jnp.bfloat16)))


def test_a_bfloat16_ema_round_trips_verified(tmp_path):
    ema = other_ema(ema_dtype=jnp.bfloat16)
    state = make_state(Wide(), ema)
    for x, y in batches(2):
        state, _ = STEP(state, x, y)
    with manager(tmp_path) as m:
        ema_jax.save_checkpoint(m, state)
        restored = ema_jax.restore_checkpoint(m, make_state(Wide(), ema, seed=1))
    assert restored.ema_params["Dense_0"]["kernel"].dtype == jnp.bfloat16
    assert_trees_equal(restored, state)


def test_the_nonfinite_guard_is_not_compared(copy, caplog):
    directory, states = copy
    ema = other_ema(skip_nonfinite=False)
    with manager(directory) as m, caplog.at_level(logging.WARNING, logger="ema_jax"):
        restored = ema_jax.restore_checkpoint(m, make_state(Wide(), ema, seed=1))
    assert_trees_equal(restored, states[2])
    assert ema_jax_records(caplog) == []


@pytest.mark.bad_input
def test_a_checkpoint_saved_without_save_checkpoint_restores_with_a_warning(tmp_path, caplog):
    state = make_state(Wide(), EMA)
    for x, y in batches(2):
        state, _ = STEP(state, x, y)
    with manager(tmp_path) as m:
        m.save(int(state.step), args=ocp.args.StandardSave(state))
    changed = make_state(Wide(), other_ema(ema_alpha=2e-2), seed=1)
    with manager(tmp_path) as m, caplog.at_level(logging.WARNING, logger="ema_jax"):
        restored = ema_jax.restore_checkpoint(m, changed)  # nothing to compare: as before
    assert_trees_equal(restored, state)
    assert len(ema_jax_records(caplog)) == 1
    assert ema_jax_records(caplog)[0].getMessage() == (
        f"checkpoint step 2 in {tmp_path} restores unverified: it was saved without"
        " ema_jax.save_checkpoint, so its arrays cannot be verified and its EMA settings"
        " cannot be compared"
    )


def test_save_checkpoint_keeps_your_metadata_and_metrics(tmp_path):
    state = make_state(Mlp(), EMA)
    options = ocp.CheckpointManagerOptions(best_fn=lambda m: m["accuracy"], max_to_keep=1)
    with ocp.CheckpointManager(
        tmp_path, item_handlers=ocp.StandardCheckpointHandler(), options=options
    ) as m:
        assert ema_jax.save_checkpoint(
            m, state, metrics={"accuracy": 0.5}, custom_metadata={"run": "a"}
        )
        assert not ema_jax.save_checkpoint(m, state)  # orbax never saves a step twice
        m.wait_until_finished()
        custom = m.item_metadata(0).custom_metadata
        assert custom["run"] == "a"
        assert custom["ema_jax"]["ema"] == EMA.settings()
        assert m.metrics(0) == {"accuracy": 0.5}


@pytest.mark.parametrize(
    ("call", "error", "text"),
    [
        (
            lambda m: ema_jax.save_checkpoint(m, {"params": {}}),
            TypeError,
            "state must be an ema_jax.EmaTrainState, got dict",
        ),
        (
            lambda m: ema_jax.save_checkpoint(
                m, make_state(Mlp(), EMA), custom_metadata={"ema_jax": 1}
            ),
            ValueError,
            "custom_metadata must not use the key 'ema_jax': it is ema_jax's",
        ),
        (
            lambda m: ema_jax.restore_checkpoint(m, make_state(Mlp(), EMA), allow_ema_change=1),
            TypeError,
            "allow_ema_change must be a bool, got 1",
        ),
    ],
    ids=["save-not-a-state", "save-reserved-key", "restore-allow-not-bool"],
)
@pytest.mark.bad_input
def test_bad_arguments_are_named(call, error, text, tmp_path):
    with manager(tmp_path) as m, pytest.raises(error, match=re.escape(text)) as raised:
        call(m)
    assert type(raised.value) is error


def scores(acc: float, ema_acc: float) -> dict[str, float]:
    return {"accuracy": acc, "ema_accuracy": ema_acc}


@pytest.mark.bad_input
def test_best_checkpoints_after_a_rollback_keep_the_better_weights(tmp_path):
    states = {}
    state = make_state(Mlp(), EMA)
    for step, (x, y) in enumerate(batches(6)):
        state, _ = STEP(state, x, y)
        states[step] = state
    with ema_jax.BestCheckpoints(tmp_path) as best:
        best.save(5, states[5], scores(0.5, 0.5))
        # The run is rolled back to step 2 and resumed: a better step 3 replaces 5.
        best.save(3, states[3], scores(0.9, 0.4))
        assert (best.best_step("raw"), best.best_step("ema")) == (3, 5)
        # The same step again, better still: it replaces itself; worse: ignored.
        best.save(3, states[4], scores(0.95, 0.3))
        best.save(2, states[2], scores(0.1, 0.1))
        best.wait_until_finished()
        assert (best.best_step("raw"), best.best_step("ema")) == (3, 5)
        assert best.best_metrics("raw") == scores(0.95, 0.3)
        raw = best.restore("raw", make_state(Mlp(), EMA, seed=1))
    assert_trees_equal(raw, {"params": states[4].params})


@pytest.mark.bad_input
def test_a_damaged_best_checkpoint_raises(tmp_path):
    state = make_state(Wide(), EMA)
    with ema_jax.BestCheckpoints(tmp_path) as best:
        best.save(0, state, scores(0.5, 0.5))
        best.wait_until_finished()
        path = max(
            (p for p in (tmp_path / "ema" / "0").rglob("*") if p.parent.name == "d"),
            key=lambda p: p.stat().st_size,
        )
        os.truncate(path, path.stat().st_size // 2)
        with pytest.raises(ema_jax.CorruptCheckpointError, match=r"checkpoint step 0 in .*ema"):
            best.restore("ema", make_state(Wide(), EMA, seed=1))
        assert_trees_equal(best.restore("raw", make_state(Wide(), EMA, seed=1)), _raw(state))


def _raw(state: ema_jax.EmaTrainState) -> dict[str, Any]:
    return {"params": state.params}


def bf16_target() -> ema_jax.EmaTrainState:
    """The target with bfloat16 parameters and ``ema_dtype=None``: its EMA is bfloat16."""
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), target().params)
    return ema_jax.EmaTrainState.create(
        apply_fn=Wide().apply, params=params, tx=optax.sgd(0.1, momentum=0.9), ema=EMA
    )


@pytest.mark.bad_input
def test_a_float32_ema_is_not_silently_cut_to_bfloat16_parameters(copy, caplog):
    # Issue 21: a float32 EMA restored into bf16 parameters (ema_dtype=None) became bf16
    # without a word, while an explicit ema_dtype change raised. Now both raise.
    directory, states = copy
    text = (
        "the averaged leaf ema_state.ema.params.Dense_0.bias is float32 in the checkpoint"
        " but bfloat16 in the target (and 3 more averaged leaves); with ema_dtype=None the"
        " EMA is kept in the parameters' dtype, so pass ema_dtype=jnp.float32"
    )
    with manager(directory) as m:
        with pytest.raises(ema_jax.EmaSettingsMismatchError, match=re.escape(text)):
            ema_jax.restore_checkpoint(m, bf16_target())
        # On purpose: verified, then cast to the target's dtypes, with a warning.
        with caplog.at_level(logging.WARNING, logger="ema_jax"):
            restored = ema_jax.restore_checkpoint(m, bf16_target(), allow_ema_change=True)
    want = jax.tree.map(lambda x: np.asarray(x).astype(jnp.bfloat16), states[2].params)
    assert_trees_equal(restored.params, want)
    assert restored.ema_params["Dense_0"]["kernel"].dtype == jnp.bfloat16
    assert len(ema_jax_records(caplog)) == 1 and text in caplog.text


def edit_record(directory: Path, step: int, edit: Any) -> None:
    """Rewrites ema_jax's record in a step's metadata file as ``edit`` says."""
    path = directory / str(step) / "default" / "_METADATA"
    metadata = json.loads(path.read_text())
    edit(metadata["custom_metadata"]["ema_jax"])
    path.write_text(json.dumps(metadata))


def drop_one_checksum(record: dict[str, Any]) -> None:
    del record["arrays"]["params.Dense_0.kernel"]


def unknown_format(record: dict[str, Any]) -> None:
    record["format"] = 2


RECORD_GAPS = {
    "a checksum removed": (drop_one_checksum, "params.Dense_0.kernel has no checksum"),
    "an unknown format": (unknown_format, "record has format 2, and this ema_jax verifies"),
}


@pytest.mark.parametrize(("edit", "text"), RECORD_GAPS.values(), ids=RECORD_GAPS.keys())
@pytest.mark.bad_input
def test_a_record_that_cannot_check_everything_is_damage(edit, text, copy, caplog):
    # Issue 21: such a record restored with no warning and skipped the check.
    directory, states = copy
    edit_record(directory, 2, edit)
    with manager(directory) as m:
        with pytest.raises(ema_jax.CorruptCheckpointError, match=re.escape(text)) as raised:
            ema_jax.restore_checkpoint(m, target(), step=2)
        with caplog.at_level(logging.WARNING, logger="ema_jax"):
            restored = ema_jax.restore_checkpoint(m, target())
    assert raised.value.step == 2
    assert_trees_equal(restored, states[1])
    assert len(ema_jax_records(caplog)) == 1 and text in caplog.text


def test_a_flipped_array_is_not_called_unreadable_metadata(copy):
    # Issue 21: damaged array data was described as "its metadata cannot be read".
    directory, _ = copy
    flip(directory)
    with manager(directory) as m, pytest.raises(ema_jax.CorruptCheckpointError) as raised:
        ema_jax.restore_checkpoint(m, target(), step=2)
    assert "metadata" not in str(raised.value)
    assert "checksum mismatch" in str(raised.value)


@pytest.mark.bad_input
def test_two_averages_are_not_restored_as_one(tmp_path):
    two = ema_jax.ema((ema_jax.schedules.constant(0.99), ema_jax.schedules.constant(0.9)))
    with manager(tmp_path) as m:
        ema_jax.save_checkpoint(m, make_state(Wide(), two))
    text = "holds an EMA with 2 average(s), but the target's has 1"
    for allow in (False, True):
        mismatch = pytest.raises(ema_jax.EmaSettingsMismatchError, match=re.escape(text))
        with manager(tmp_path) as m, mismatch:
            ema_jax.restore_checkpoint(m, target(), allow_ema_change=allow)


def test_best_checkpoints_take_a_relative_directory(tmp_path, monkeypatch):
    # Issue 21: orbax refuses relative paths; BestCheckpoints resolves them first.
    monkeypatch.chdir(tmp_path)
    state = make_state(Wide(), EMA)
    with ema_jax.BestCheckpoints("best") as best:
        best.save(0, state, scores(0.5, 0.5))
        restored = best.restore("ema", target())
    assert best.directory == str(tmp_path / "best")
    assert_trees_equal(restored, state.ema_variables())


@pytest.mark.parametrize(
    "saved_form",
    [None, "nnx", "lerp"],
    ids=["saved-before-form-existed", "nnx", "lerp"],
)
def test_constants_blend_form_is_not_a_settings_change(tmp_path, saved_form, caplog):
    # The lerp and nnx.EMA's blend are one average up to an ulp per update: a checkpoint
    # of either (or of the days before ``form``, which blended as nnx) resumes under the
    # default without a mismatch; another decay still raises.
    saved_ema = ema_jax.ema(ema_jax.schedules.constant(0.99, form=saved_form or "nnx"))
    state = make_state(Wide(), saved_ema, seed=0)
    with manager(tmp_path) as m:
        ema_jax.save_checkpoint(m, state)
        m.wait_until_finished()
    if saved_form is None:  # rewrite the record as the code before ``form`` wrote it
        (meta,) = tmp_path.glob("*/default/_METADATA")
        record = json.loads(meta.read_text())
        del record["custom_metadata"]["ema_jax"]["ema"]["schedule"]["form"]
        meta.write_text(json.dumps(record))
    default = ema_jax.ema(ema_jax.schedules.constant(0.99))
    with manager(tmp_path) as m, caplog.at_level(logging.WARNING, logger="ema_jax"):
        restored = ema_jax.restore_checkpoint(m, make_state(Wide(), default, seed=1))
        assert_trees_equal(restored.ema_state, state.ema_state)
        assert ema_jax_records(caplog) == []
        with pytest.raises(ema_jax.EmaSettingsMismatchError, match=r"schedule\.decay is 0\.99"):
            other = ema_jax.ema(ema_jax.schedules.constant(0.9))
            ema_jax.restore_checkpoint(m, make_state(Wide(), other, seed=1))

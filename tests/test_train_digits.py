"""The main example, end to end in its shortened mode: train, resume, report."""

from __future__ import annotations

import importlib.util
import logging
import pathlib
import shutil

import pytest

EXAMPLE = pathlib.Path(__file__).parents[1] / "examples" / "train_digits.py"


@pytest.fixture(scope="module")
def train_digits():
    spec = importlib.util.spec_from_file_location("train_digits", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_trains_resumes_and_reports(train_digits, tmp_path, capsys, caplog):
    argv = ["--quick", "--no-progress", "--workdir", str(tmp_path)]
    first = train_digits.main(argv)
    out = capsys.readouterr().out
    assert first["trained_epochs"] == 2
    assert [row["epoch"] for row in first["history"]] == [1, 2]
    keys = ("accuracy", "ema_accuracy", "ema_precise_accuracy")  # precise BN by default
    assert all(0 <= row[k] <= 1 for row in first["history"] for k in keys)
    assert "Precise BN statistics after every epoch, from 8 training batches" in out
    assert "EMA pBN: EMA weights, precise BN statistics" in out
    assert "epoch  raw acc  EMA acc  EMA pBN acc" in out
    assert "best EMA (precise BN statistics):" in out
    assert first["nonfinite_updates"] == 0
    assert (tmp_path / "curves.png").stat().st_size > 0
    assert {p.name for p in (tmp_path / "best").iterdir()} == {"raw", "ema"}

    # Killed before its last checkpoint: the rerun resumes from epoch 1 and, with the
    # EMA and the data order restored, reproduces the first run exactly.
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [8, 16]
    shutil.rmtree(tmp_path / "checkpoints" / "16")
    second = train_digits.main([*argv, "--no-plot"])
    assert "Resuming from epoch 1" in capsys.readouterr().out
    assert second["trained_epochs"] == 1
    assert second["history"] == first["history"]
    assert second["best"] == first["best"]

    # Complete: nothing to train, the same report.
    third = train_digits.main([*argv, "--no-plot"])
    assert "nothing to train" in capsys.readouterr().out
    assert third["trained_epochs"] == 0 and third["history"] == first["history"]

    # Its last checkpoint damaged on disk (64 bytes flipped in its largest data file):
    # the rerun says which step it skipped, resumes from the one before and again
    # reproduces the first run.
    path = max(
        (p for p in (tmp_path / "checkpoints" / "16").rglob("*") if p.parent.name == "d"),
        key=lambda p: p.stat().st_size,
    )
    data = bytearray(path.read_bytes())
    middle = slice(len(data) // 2 - 32, len(data) // 2 + 32)
    data[middle] = bytes(b ^ 0xFF for b in data[middle])
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="ema_jax"):
        fourth = train_digits.main([*argv, "--no-plot"])
    out = capsys.readouterr().out
    assert "skipped checkpoint step 16: checkpoint step 16 in" in caplog.text
    assert "Deleted checkpoint step 16" in out and "Resuming from epoch 1" in out
    assert fourth["trained_epochs"] == 1
    assert fourth["history"] == first["history"] and fourth["best"] == first["best"]

    # Other settings in the same workdir would mix two runs: the EMA's, or the others.
    with pytest.raises(SystemExit, match="holds a run with other settings"):
        train_digits.main([*argv, "--seed", "1"])
    with pytest.raises(SystemExit, match=r"holds a run with other settings .*ema_alpha"):
        train_digits.main([*argv, "--ema-alpha", "0.02"])
    with pytest.raises(SystemExit, match="holds a run with other settings"):
        train_digits.main([*argv, "--no-precise-bn"])


def test_example_without_precise_batch_norm(train_digits, tmp_path, capsys):
    argv = ["--quick", "--no-progress", "--no-plot", "--no-precise-bn", "--workdir", str(tmp_path)]
    result = train_digits.main(argv)
    out = capsys.readouterr().out
    assert "Precise BN" not in out and "pBN" not in out
    assert "epoch  raw acc  EMA acc\n" in out and "best EMA: " in out
    assert all("ema_precise_accuracy" not in row for row in result["history"])


def test_ema_option_picks_pycls_or_bema(train_digits):
    import ema_jax

    pycls = train_digits.parse_args(["--quick"])
    bema = train_digits.parse_args(["--quick", "--ema", "bema", "--update-period", "2"])
    assert pycls.ema == "pycls" and "ema" in train_digits.RUN_SETTINGS
    assert isinstance(train_digits.make_transform(pycls, 8), ema_jax.Ema)
    transform = train_digits.make_transform(bema, 8)
    assert transform.settings() == ema_jax.bema(update_period=2, update_after=8).settings()
    assert "EMA alpha per update varies, every 2 steps" in train_digits.describe(
        transform, 8, (256, 450)
    )
    with pytest.raises(SystemExit):
        train_digits.parse_args(["--ema", "swa"])


def test_ema_dtype_and_rounding_options(train_digits):
    import jax.numpy as jnp

    args = train_digits.parse_args(
        ["--quick", "--ema-dtype", "bfloat16", "--rounding", "stochastic"]
    )
    ema = train_digits.make_transform(args, 8)
    assert ema.ema_dtype == jnp.bfloat16 and ema.rounding == "stochastic"
    assert {"ema_dtype", "rounding"} <= set(train_digits.RUN_SETTINGS)
    assert train_digits.make_transform(train_digits.parse_args(["--quick"]), 8).ema_dtype is None
    with pytest.raises(SystemExit):  # float32 rounds exactly: stochastic has nothing to do
        train_digits.parse_args(["--rounding", "stochastic"])

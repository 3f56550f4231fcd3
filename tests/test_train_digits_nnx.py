"""The NNX example, end to end in its shortened mode: train, resume, report."""

from __future__ import annotations

import importlib.util
import logging
import pathlib
import shutil

import pytest

EXAMPLE = pathlib.Path(__file__).parents[1] / "examples" / "train_digits_nnx.py"


@pytest.fixture(scope="module")
def train_digits_nnx():
    spec = importlib.util.spec_from_file_location("train_digits_nnx", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_trains_resumes_and_reports(train_digits_nnx, tmp_path, capsys, caplog):
    argv = ["--quick", "--no-progress", "--workdir", str(tmp_path)]
    first = train_digits_nnx.main(argv)
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

    # Killed before its last checkpoint: the rerun restores model, optimizer and EMA
    # into an abstract target, resumes from epoch 1 and reproduces the first run exactly.
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [8, 16]
    shutil.rmtree(tmp_path / "checkpoints" / "16")
    second = train_digits_nnx.main([*argv, "--no-plot"])
    assert "Resuming from epoch 1" in capsys.readouterr().out
    assert second["trained_epochs"] == 1
    assert second["history"] == first["history"]
    assert second["best"] == first["best"]

    # Complete: nothing to train, the same report.
    third = train_digits_nnx.main([*argv, "--no-plot"])
    assert "nothing to train" in capsys.readouterr().out
    assert third["trained_epochs"] == 0 and third["history"] == first["history"]

    # A damaged last checkpoint (a flipped byte in its largest data file): skipped with
    # a warning naming it, deleted, and the epoch after the intact one trained again.
    data = [p for p in (tmp_path / "checkpoints" / "16").rglob("*") if p.parent.name == "d"]
    largest = max(data, key=lambda p: p.stat().st_size)
    damaged = bytearray(largest.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    largest.write_bytes(bytes(damaged))
    with caplog.at_level(logging.WARNING, logger="ema_jax"):
        fourth = train_digits_nnx.main([*argv, "--no-plot"])
    assert "skipped checkpoint step 16" in caplog.text
    assert "Deleted checkpoint step 16: it failed verification" in capsys.readouterr().out
    assert fourth["trained_epochs"] == 1 and fourth["history"] == first["history"]

    # Other settings in the same workdir would mix two runs.
    with pytest.raises(SystemExit, match="holds a run with other settings"):
        train_digits_nnx.main([*argv, "--seed", "1"])
    with pytest.raises(SystemExit, match="holds a run with other settings"):
        train_digits_nnx.main([*argv, "--no-precise-bn"])


def test_example_without_precise_batch_norm(train_digits_nnx, tmp_path, capsys):
    argv = ["--quick", "--no-progress", "--no-plot", "--no-precise-bn", "--workdir", str(tmp_path)]
    result = train_digits_nnx.main(argv)
    out = capsys.readouterr().out
    assert "Precise BN" not in out and "pBN" not in out
    assert "epoch  raw acc  EMA acc\n" in out and "best EMA: " in out
    assert all("ema_precise_accuracy" not in row for row in result["history"])

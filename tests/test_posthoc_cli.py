"""`python -m ema_jax posthoc`: list snapshots, write reconstructions, one-line errors."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from ema_jax import __main__ as cli
from ema_jax import posthoc

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def snapshot_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("snapshots")
    ema = posthoc.trackers(batch_size=4, update_period=2)
    params = {"w": jnp.zeros((2, 3)), "b": jnp.zeros(3)}
    state = ema.init(params)
    with posthoc.Snapshots(directory, snapshot_every=5, dtype="bfloat16") as snapshots:
        for i in range(20):
            params = jax.tree.map(
                lambda p, i=i: p + jnp.sin(i + jnp.arange(p.size)).reshape(p.shape), params
            )
            state = ema.update(params, state)
            snapshots.save(state, ema=ema, step=i + 1)
    return directory


def fail(capsys, *argv):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["posthoc", *argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.count("\n") == 1 and err.startswith("python -m ema_jax posthoc: error: ")
    return err


def test_list_shows_every_snapshot_with_its_averages(snapshot_dir):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run(
        [sys.executable, "-m", "ema_jax", "posthoc", "--dir", str(snapshot_dir), "--list"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith(f"4 snapshots in {snapshot_dir} (model fingerprint ")
    assert lines[0].endswith(", 2 leaves)")
    assert [line.split()[0] for line in lines[2:]] == ["5", "10", "15", "20"]
    # Step 20, update period 2: the last update was call 18, after 19 steps of 4 samples.
    assert lines[-1].split()[1] == "76"
    assert "bfloat16" in lines[-1] and "KiB" in lines[-1]
    assert lines[-1].endswith("0.05: 0.05 / 16.97, 0.1: 0.1 / 6.937")


def test_writes_one_checkpoint_per_sigma_rel_equal_to_reconstruct(snapshot_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert (
        cli.main(
            [
                "posthoc",
                "--dir",
                str(snapshot_dir),
                "--sigma-rel",
                "0.05,0.07",
                "--step",
                "15",
                "--out",
                str(out),
                "--allow-extrapolation",
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    printed = captured.out.splitlines()
    # 3 snapshots per average: 0.07's profile is missed by more than WARN_RESIDUAL.
    warned = captured.err.splitlines()
    assert len(warned) == 1 and warned[0].startswith(
        "WARNING (--allow-extrapolation): sigma_rel=0.07"
    )
    assert printed[0].split()[:4] == ["sigma_rel", "gamma", "step", "residual"]
    assert sorted(p.name for p in out.iterdir()) == [
        "sigma_rel_0.05_step_15",
        "sigma_rel_0.07_step_15",
    ]
    for sigma_rel in (0.05, 0.07):
        path = out / f"sigma_rel_{sigma_rel:g}_step_15"
        with ocp.StandardCheckpointer() as checkpointer:
            restored = checkpointer.restore(path)
            meta = checkpointer.metadata(path).custom_metadata["ema_jax"]["reconstruction"]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", posthoc.ExtrapolationWarning)
            expected = posthoc.reconstruct(snapshot_dir, sigma_rel, step=15)
        jax.tree.map(np.testing.assert_array_equal, restored, expected)
        assert meta["sigma_rel"] == sigma_rel and meta["step"] == 15
    # Writing the same reconstructions again would overwrite them: refused.
    err = fail(
        capsys, "--dir", str(snapshot_dir), "--sigma-rel", "0.07", "--step", "15", "--out",
        str(out), "--allow-extrapolation",
    )  # fmt: skip
    assert "exists" in err


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--sigma-rel", "0.3", "--out", "x"], "sigma_rel must be in (0, sqrt(1/12)"),
        (["--sigma-rel", "0.05,abc", "--out", "x"], "--sigma-rel must be numbers"),
        (["--sigma-rel", "0.07", "--out", "x", "--step", "12"], "no snapshot at step 12"),
        (["--sigma-rel", "0.07", "--out", "x", "--step", "1.5"], "--step must be an integer"),
        (["--sigma-rel", "0.07"], "--sigma-rel needs --out"),
        ([], "exactly one of --list and --sigma-rel"),
        (["--list", "--sigma-rel", "0.07"], "exactly one of --list and --sigma-rel"),
        (["--list", "--step", "5"], "--list takes no --out, --step"),
        (["--list", "--allow-extrapolation"], "--list takes no --out, --step"),
    ],
)
def test_bad_arguments_give_one_line_and_exit_2(snapshot_dir, capsys, argv, match):
    assert match in fail(capsys, "--dir", str(snapshot_dir), *argv)


@pytest.mark.bad_input
def test_a_directory_without_snapshots_gives_one_line_and_exit_2(tmp_path, capsys):
    assert "not a directory" in fail(capsys, "--dir", str(tmp_path / "none"), "--list")
    assert "no finalized steps" in fail(capsys, "--dir", str(tmp_path), "--list")


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("sigma_rel", "residual"), [("0.07", "0.051"), ("0.001", "1.2"), ("0.05,0.28", "0.74")]
)
def test_a_width_the_snapshots_do_not_reach_is_refused(
    snapshot_dir, tmp_path, capsys, sigma_rel, residual
):
    # Step 15: three snapshots of 0.05 and 0.10 each. Before, each was written, exit 0.
    out = tmp_path / "out"
    err = fail(capsys, "--dir", str(snapshot_dir), "--sigma-rel", sigma_rel, "--step", "15",
               "--out", str(out))  # fmt: skip
    assert f"residual {residual} > 0.02 at step 15" in err
    assert "--allow-extrapolation" in err and not out.exists()

"""Checkpoint errors that tell the truth (issue 21): relative directories are read, not
called corrupt; damaged array data is named as such, not as unreadable metadata; and
a failed read leaves one line on stderr, without asyncio's "Event loop is closed".

Why the tracebacks came: orbax reads a step's arrays (and their zarr metadata, which
OCDBT keeps among the data) as one ``asyncio.gather`` on an event loop of its own; the
first read that fails ends the gather, orbax closes the loop, and the TensorStore reads
still in flight complete later and call ``loop.call_soon_threadsafe`` on the closed
loop, whose ``RuntimeError`` is printed from TensorStore's thread. ema_jax cannot wait
for reads that orbax no longer tracks; every read it makes (linen, NNX, BestCheckpoints
and, before this fix not, post-hoc snapshots) now runs inside
``ema_jax._checkpoint.quiet_storage``, which, after a failure, collects the abandoned
reads while its hook drops their reports, and the diagnosing checkpointer of
``first_unreadable`` is closed in ``finally``.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

import ema_jax
from ema_jax import __main__ as cli
from ema_jax import posthoc

ROOT = pathlib.Path(__file__).resolve().parents[1]


def write_snapshots(directory: pathlib.Path) -> None:
    """Three snapshots of arrays large enough (64 KiB) to sit in OCDBT data files."""
    ema = posthoc.trackers((0.05, 0.10), batch_size=8)
    shape = (128, 128)
    state = ema.init({"w": jnp.zeros(shape), "b": jnp.zeros(shape)})
    with posthoc.Snapshots(directory, snapshot_every=10) as snapshots:
        for step in range(1, 31):
            wave = jnp.sin(jnp.arange(np.prod(shape), dtype=jnp.float32) * step).reshape(shape)
            state = ema.update({"w": wave, "b": 2 * wave}, state)
            snapshots.save(state, ema=ema, step=step)


@pytest.fixture(scope="module")
def snapshot_dir(tmp_path_factory) -> pathlib.Path:
    directory = tmp_path_factory.mktemp("messages") / "snaps"
    write_snapshots(directory)
    return directory


@pytest.fixture
def damaged(snapshot_dir, tmp_path) -> pathlib.Path:
    """A copy whose step 20 has every data file cut to a third, as an interrupted copy."""
    directory = tmp_path / "snaps"
    shutil.copytree(snapshot_dir, directory)
    for path in (directory / "20").rglob("*"):
        if path.is_file() and path.parent.name == "d":
            os.truncate(path, path.stat().st_size // 3)
    return directory


def test_a_relative_directory_is_read(snapshot_dir, monkeypatch, capsys):
    want = posthoc.reconstruct(snapshot_dir, 0.1)  # a tracked width: no extrapolation
    monkeypatch.chdir(snapshot_dir.parent)
    got = posthoc.reconstruct("snaps", 0.1)
    np.testing.assert_array_equal(got["w"], want["w"])
    assert [info.step for info in posthoc.list_snapshots("snaps")] == [10, 20, 30]
    assert cli.main(["posthoc", "--dir", "snaps", "--list"]) == 0
    assert capsys.readouterr().out.startswith("3 snapshots in snaps (model fingerprint ")


@pytest.mark.bad_input
def test_damaged_array_data_is_named_as_such(damaged, capfd):
    with pytest.raises(ema_jax.CorruptCheckpointError) as raised:
        posthoc.reconstruct(damaged, 0.07)
    message = str(raised.value)
    assert message.startswith(f"snapshot step 20 in {damaged} is corrupt: ")
    assert "metadata" not in message.split(" (")[0], message
    assert "cannot be read (its data is damaged" in message
    assert raised.value.path in (
        "averages.0.05.w",
        "averages.0.05.b",
        "averages.0.1.w",
        "averages.0.1.b",
    )
    err = capfd.readouterr().err
    assert "Event loop is closed" not in err and "Traceback" not in err, err[:2000]


@pytest.mark.bad_input
def test_the_cli_prints_one_line_for_a_damaged_snapshot(damaged):
    # In a fresh process, as a user runs it: stderr is the one error line, nothing else.
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [sys.executable, "-m", "ema_jax", "posthoc", "--dir", str(damaged), "--list"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1, done.stderr[:3000]
    assert "snapshot step 20" in done.stderr and "its data is damaged" in done.stderr


def test_the_checkpoint_module_imports_no_framework_and_no_adapter():
    # One home for the checkpoint plumbing (issue 18): linen, nnx and posthoc use it,
    # and it uses none of them, nor Flax; the adapters import nothing private of each other.
    import ast

    package = ROOT / "ema_jax"

    def imports(path: pathlib.Path) -> set[str]:
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        return names

    for path in (package / "_checkpoint").glob("*.py"):
        bad = {n for n in imports(path) if n.split(".")[0] == "flax"}
        bad |= {n for n in imports(path) if n.startswith(("ema_jax.linen", "ema_jax.nnx"))}
        bad |= {n for n in imports(path) if n.startswith("ema_jax.posthoc")}
        assert not bad, (path.name, bad)
    for adapter in ("linen", "nnx", "posthoc"):
        others = [f"ema_jax.{a}._" for a in ("linen", "nnx", "posthoc") if a != adapter]
        for path in (package / adapter).glob("*.py"):
            bad = {n for n in imports(path) if n.startswith(tuple(others))}
            assert not bad, (adapter, path.name, bad)

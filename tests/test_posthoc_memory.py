"""Post-hoc at bounded memory: the float64 sums held at once do not grow with the number
of widths (traced by tracemalloc, which sees NumPy's buffers), and results go onto
``like``'s shardings leaf by leaf. benchmarks/bench_posthoc_memory.py measures the
CLI's peak RSS in a subprocess."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import tracemalloc
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

from ema_jax import posthoc
from ema_jax.posthoc import _cli
from ema_jax.posthoc import _leafwise

ROOT = pathlib.Path(__file__).resolve().parents[1]
SIZE = 2**18  # float32 weights in the big leaf: its float64 sum is 2 MiB
WIDTHS = list(np.round(np.linspace(0.055, 0.095, 6), 4))


@pytest.fixture(scope="module")
def snapshot_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("snapshots")
    ema = posthoc.trackers(batch_size=4)
    params = {"big": jnp.zeros(SIZE), "small": jnp.zeros((3, 5)), "count": jnp.zeros((), jnp.int32)}
    state = ema.init(params)
    update = jax.jit(ema.update)
    with posthoc.Snapshots(directory, snapshot_every=1) as snapshots:
        for step in range(1, 13):
            params = jax.tree.map(lambda p, s=step: p + s, params)
            state = update(params, state)
            snapshots.save(state, ema=ema, step=step)
    return directory


def peak(call):
    """Peak bytes traced (NumPy's buffers among them) while ``call()`` runs."""
    tracemalloc.start()
    try:
        call()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def quiet(call):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", posthoc.ExtrapolationWarning)
        return call()


def test_the_cli_holds_one_width_at_a_time(snapshot_dir, tmp_path, monkeypatch):
    # A budget below one width's sum and result: one width per pass. Before, the CLI held
    # one float64 sum per width (6 x 2 MiB here).
    monkeypatch.setattr(_leafwise, "MEMORY_BUDGET", 8 * SIZE)

    def write(widths, out):
        return quiet(lambda: _cli.write(str(snapshot_dir), widths, None, out, allow=True))

    one = peak(lambda: write(WIDTHS[:1], str(tmp_path / "1")))
    many = peak(lambda: write(WIDTHS, str(tmp_path / "many")))
    assert one > 8 * SIZE  # the traced peak holds a width's sum: the arrays dominate
    assert many <= 1.3 * one, (many / one, one)


def test_reconstruct_holds_one_batch_of_sums_beside_its_results(snapshot_dir, monkeypatch):
    monkeypatch.setattr(_leafwise, "MEMORY_BUDGET", 8 * SIZE)
    result = 4 * SIZE  # each width's float32 result is returned, so it stays
    one = peak(lambda: quiet(lambda: posthoc.reconstruct(snapshot_dir, WIDTHS[:1])))
    many = peak(lambda: quiet(lambda: posthoc.reconstruct(snapshot_dir, WIDTHS)))
    assert many - 5 * result <= 1.3 * one, ((many - 5 * result) / one, one)


def test_batches_and_groups_give_what_one_pass_gives(snapshot_dir, monkeypatch):
    whole = quiet(lambda: posthoc.reconstruct(snapshot_dir, WIDTHS[:5]))
    assert _leafwise.plan(posthoc.list_snapshots(snapshot_dir)[0].leaves, 5)[1] == 5
    monkeypatch.setattr(_leafwise, "MEMORY_BUDGET", 1)  # a leaf per read, a width per pass
    split = quiet(lambda: posthoc.reconstruct(snapshot_dir, WIDTHS[:5]))
    for a, b in zip(whole, split, strict=True):
        jax.tree.map(np.testing.assert_array_equal, a, b)
        assert b["count"].dtype == np.int32 and int(b["count"]) == 12 * 13 // 2


def test_results_go_onto_likes_shardings(snapshot_dir):
    mesh = Mesh(np.array(jax.devices()[:1]), ("x",))
    on = NamedSharding(mesh, PartitionSpec("x"))
    like = {
        "big": jax.ShapeDtypeStruct((SIZE,), jnp.float32, sharding=on),
        "small": np.zeros((3, 5), np.float32),
        "count": jax.ShapeDtypeStruct((), jnp.int32),
    }
    got = quiet(lambda: posthoc.reconstruct(snapshot_dir, 0.07, like=like))
    plain = quiet(lambda: posthoc.reconstruct(snapshot_dir, 0.07))
    assert isinstance(got["big"], jax.Array) and got["big"].sharding == on
    assert isinstance(got["small"], np.ndarray)
    jax.tree.map(np.testing.assert_array_equal, got, plain)


SHARDED = """
import sys, warnings
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from ema_jax import posthoc

directory = sys.argv[1]
ema = posthoc.trackers(batch_size=4)
params = {"a": jnp.zeros(8), "b": jnp.zeros(3)}
state = ema.init(params)
with posthoc.Snapshots(directory, snapshot_every=1) as snapshots:
    for step in range(1, 13):
        params = jax.tree.map(lambda p, s=step: p + s + jnp.arange(p.size), params)
        state = ema.update(params, state)
        snapshots.save(state, ema=ema, step=step)
split = NamedSharding(Mesh(np.array(jax.devices()), ("x",)), PartitionSpec("x"))
whole = NamedSharding(Mesh(np.array(jax.devices()), ("x",)), PartitionSpec())
like = {"a": jax.ShapeDtypeStruct((8,), jnp.float32, sharding=split),
        "b": jax.ShapeDtypeStruct((3,), jnp.float32, sharding=whole)}
got = posthoc.reconstruct(directory, 0.07, like=like)
plain = posthoc.reconstruct(directory, 0.07)
assert got["a"].sharding == split and len(got["a"].addressable_shards) == 4, got["a"].sharding
assert got["b"].sharding == whole
np.testing.assert_array_equal(np.asarray(got["a"]), plain["a"])
like["b"] = jax.ShapeDtypeStruct((3,), jnp.float32, sharding=split)  # 3 over 4 devices
try:
    posthoc.reconstruct(directory, 0.07, like=like)
except ValueError as err:
    print("ERROR:", err)
"""


@pytest.mark.bad_input
def test_results_go_onto_shardings_of_four_devices_and_one_that_does_not_fit_is_named(tmp_path):
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_force_host_platform_device_count=4",
        PYTHONPATH=str(ROOT),
    )
    proc = subprocess.run(
        [sys.executable, "-c", SHARDED, str(tmp_path)], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0, proc.stderr
    assert "ERROR: like's sharding of b does not fit its shape (3,)" in proc.stdout, proc.stdout


def test_the_plan_keeps_every_batch_within_the_budget():
    rng = np.random.default_rng(0)
    for _ in range(300):
        leaves = {f"l{k}": {"shape": [int(n)]} for k, n in enumerate(rng.integers(1, 5000, 12))}
        widths = int(rng.integers(1, 30))
        budget = int(rng.integers(1, 200_000))
        result = int(rng.choice([0, rng.integers(1, 50_000)]))
        groups, batch = _leafwise.plan(leaves, widths, result_bytes=result, budget=budget)
        assert [p for group in groups for p in group] == list(leaves)  # each once, in order
        assert 1 <= batch <= widths
        largest = max(8 * sum(leaves[p]["shape"][0] for p in group) for group in groups)
        assert batch == 1 or batch * (largest + result) <= budget, (groups, batch)

"""One of two processes of a multi-host run on CPU: test_multihost.py starts them.

Run as ``python tests/support/multihost_worker.py PHASE PROCESS_ID PORT WORKDIR`` with
``XLA_FLAGS=--xla_force_host_platform_device_count=2``: the two processes join
through ``jax.distributed`` (gloo collectives) into one runtime of 4 devices.

- ``train``: an ``EmaTrainState`` whose parameters are split over all 4 devices
  (FSDP: each process holds half of every leaf) trains a few steps, then is
  saved with orbax to WORKDIR/ckpt, every process writing its own shards.
  Process 0 writes the gathered EMA to WORKDIR/ema.npz.
- ``restore``: fresh processes restore the state onto another layout (tensor
  parallel on a 2 x 2 mesh, so every leaf is re-sharded across the processes),
  check its EMA against ema.npz bit for bit, and train one more step.

Any failed check raises, so the process exits non-zero.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from support import sharded

STEPS = 3
TRAIN_LAYOUT, TRAIN_MESH = "fsdp", (4,)
RESTORE_LAYOUT, RESTORE_MESH = "tensor_parallel", (2, 2)


def _check_layout(state: Any, shardings: Any, devices: list[Any]) -> None:
    """Every leaf has its requested sharding; the EMA the sharding of its parameter."""
    for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(shardings), strict=True):
        assert got.sharding.is_equivalent_to(want, got.ndim), (got.sharding, want)
    for path, src, ema in sharded.params_and_ema_pairs(state):
        assert ema.sharding.is_equivalent_to(src.sharding, src.ndim), (path, ema.sharding)
        assert set(ema.sharding.device_set) == set(devices), path


def train(workdir: Path) -> None:
    layout = sharded.LAYOUTS[TRAIN_LAYOUT]
    mesh = sharded.make_mesh(layout, shape=TRAIN_MESH)
    # The default EMA: its NaN count is a scalar all-reduce across the processes.
    state = sharded.sharded_state(sharded.make_ema(), mesh, layout.rule)
    shardings = jax.tree.map(lambda a: a.sharding, state)
    # FSDP: every EMA leaf is split between the two processes.
    assert all(not e.is_fully_addressable for _, _, e in sharded.params_and_ema_pairs(state))
    step = jax.jit(
        sharded.make_train_step(shardings.params),
        donate_argnums=0,
        out_shardings=(shardings, None),
    )
    for i in range(STEPS):
        state, _ = step(state, *sharded.global_batch(i, mesh, layout.batch_spec))
        _check_layout(state, shardings, jax.devices())
    manager = ocp.CheckpointManager(workdir / "ckpt")
    manager.save(STEPS, args=ocp.args.StandardSave(state))
    manager.wait_until_finished()
    manager.close()
    ema = multihost_utils.process_allgather(dict(state.ema_state.ema), tiled=True)
    if jax.process_index() == 0:
        flat = jax.tree_util.tree_flatten_with_path(ema)[0]
        np.savez(workdir / "ema.npz", **{jax.tree_util.keystr(p): v for p, v in flat})


def restore(workdir: Path) -> None:

    layout = sharded.LAYOUTS[RESTORE_LAYOUT]
    mesh = sharded.make_mesh(layout, shape=RESTORE_MESH)
    ema = sharded.make_ema()
    abstract = jax.eval_shape(lambda: sharded.create_state(ema))
    shardings = sharded.shardings_for(abstract, mesh, layout.rule)
    manager = ocp.CheckpointManager(workdir / "ckpt")
    assert manager.latest_step() == STEPS, manager.latest_step()
    state = manager.restore(
        STEPS, args=ocp.args.StandardRestore(sharded.abstract_like(abstract, shardings))
    )
    manager.close()
    _check_layout(state, shardings, jax.devices())
    assert int(state.step) == int(state.ema_state.step) == STEPS
    assert int(state.ema_state.nonfinite_updates) == 0
    got = multihost_utils.process_allgather(dict(state.ema_state.ema), tiled=True)
    want = np.load(workdir / "ema.npz")
    flat = jax.tree_util.tree_flatten_with_path(got)[0]
    assert sorted(want.files) == sorted(jax.tree_util.keystr(p) for p, _ in flat)
    for path, value in flat:
        np.testing.assert_array_equal(value, want[jax.tree_util.keystr(path)])
    step = jax.jit(
        sharded.make_train_step(shardings.params),
        donate_argnums=0,
        out_shardings=(shardings, None),
    )
    state, _ = step(state, *sharded.global_batch(STEPS, mesh, layout.batch_spec))
    _check_layout(state, shardings, jax.devices())
    assert int(state.ema_state.step) == STEPS + 1


def main(phase: str, process_id: int, port: int, workdir: Path) -> None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=2,
        process_id=process_id,
        # Only reached if the peer never starts: not a budget for the work, which is
        # waited for however long it takes; importing JAX on a loaded machine is slow.
        initialization_timeout=600,
        shutdown_timeout_seconds=600,  # the peer may finish later on a loaded machine
    )
    assert jax.process_count() == 2 and jax.device_count() == 4, jax.devices()
    assert jax.local_device_count() == 2, jax.local_devices()
    {"train": train, "restore": restore}[phase](workdir)
    print(f"process {process_id}: {phase} ok", flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))

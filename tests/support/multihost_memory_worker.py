"""One of two processes of a host-resident EMA run on CPU: test_multihost.py starts them.

Run as ``python tests/support/multihost_memory_worker.py memory PROCESS_ID PORT WORKDIR``
with ``XLA_FLAGS=--xla_force_host_platform_device_count=4``: the two processes join
through ``jax.distributed`` (gloo collectives) into one runtime of 8 devices, and the
parameters are split over all 8 (a 4 x 2 mesh), so each process holds its own shards.

- One average and two: ``ema(..., memory_kind="pinned_host")`` keeps every EMA leaf in
  pinned host memory with the parameters' spec and devices, through ``init`` and 20
  jitted, donated updates, and equals the on-device EMA bit for bit (this process's
  shards), which is within float32 rounding of a NumPy transcription of the update.
- An ``EmaTrainState`` with a pinned-host EMA trains, is saved with
  ``ema_jax.save_checkpoint`` to WORKDIR/ckpt (every process writing its shards) and
  restored with ``ema_jax.restore_checkpoint`` (verified) into a target of other values:
  the EMA comes back in pinned host memory, with the values saved.
- ``posthoc.trackers`` in pinned host memory: bit for bit the on-device trackers; the
  ``posthoc.Snapshots`` both processes write reconstruct a tracked width whole.
- ``ema_jax.nnx.Ema`` of a model split over both processes: the same placement, and
  bit for bit the on-device ``Ema``.
- The pitfall: out_shardings that forget the memory kind put the EMA on the device,
  and the update raises rather than keep it there.

Any failed check raises, so the process exits non-zero.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import ema_jax
from ema_jax import posthoc
from ema_jax import schedules
from ema_jax.nnx import Ema
from support import memory_worker
from support import sharded

STEPS = memory_worker.STEPS  # 20 updates, as on one process
MESH = ((4, 2), ("data", "model"))
SPECS = {"kernel": P("data", "model"), "bias": P("model"), "scale": P(), "count": P()}
VALUES = {
    "kernel": np.arange(64 * 32, dtype=np.float32).reshape(64, 32) / 2048,
    "bias": np.linspace(-1, 1, 32, dtype=np.float32),
    "scale": np.ones(16, np.float32),
    "count": np.int32(0),
}
EPS32 = float(np.finfo(np.float32).eps)
TX = optax.sgd(0.1)  # one optimizer and apply_fn: states built twice have one structure


def apply(params: Any, x: jax.Array) -> jax.Array:
    return x


def global_params(mesh: jax.sharding.Mesh, values: dict[str, np.ndarray]) -> dict[str, Any]:
    """``values`` as global arrays on ``mesh``; each process fills only its own shards."""
    return {
        k: jax.make_array_from_callback(
            np.shape(v), NamedSharding(mesh, SPECS[k]), lambda idx, v=v: np.asarray(v)[idx]
        )
        for k, v in values.items()
    }


def numpy_trajectory(values: dict[str, np.ndarray], i: int) -> dict[str, np.ndarray]:
    """The parameters of update ``i``: memory_worker.trajectory's, computed in NumPy."""

    def one(v: np.ndarray) -> np.ndarray:
        if np.asarray(v).dtype == np.int32:
            return np.int32(v + i)
        return v * np.float32(0.9) + np.float32(0.01 * i)

    return {k: one(v) for k, v in values.items()}


def numpy_ema(name: str) -> dict[str, np.ndarray]:
    """The EMA after STEPS updates, in float64: ``e + alpha_u * (p - e)`` per schedule."""
    scheds = memory_worker.SCHEDULES[name]
    scheds = scheds if isinstance(scheds, tuple) else (scheds,)
    trajectory = [numpy_trajectory(VALUES, i) for i in range(STEPS)]
    columns: dict[str, list[np.ndarray]] = {k: [] for k in VALUES}
    for s in scheds:
        plans = [s.plan(jnp.int32(i)) for i in range(STEPS)]
        for k, v in VALUES.items():
            e = np.asarray(v, np.float64)
            for p, plan in zip(trajectory, plans, strict=True):
                if not bool(plan.update):
                    continue
                if np.asarray(v).dtype == np.int32:  # integer leaves are copied
                    e = np.asarray(p[k], np.float64)
                else:
                    e = e + float(plan.alpha) * (np.asarray(p[k], np.float64) - e)
            columns[k].append(e)
    return {k: np.stack(c, -1) if len(scheds) > 1 else c[0] for k, c in columns.items()}


def assert_own_shards(x: jax.Array, like: jax.Array, path: str) -> None:
    """``x``'s shards on this process's devices only, where ``like`` has its shards."""
    local = set(jax.local_devices())
    assert {s.device for s in x.addressable_shards} <= local, path
    assert x.sharding.device_set == like.sharding.device_set, path
    if not like.is_fully_replicated:  # split between the processes: half of it here
        assert not x.is_fully_addressable, (path, x.sharding)
    want = {s.device: s.index for s in like.addressable_shards}
    for s in x.addressable_shards:
        assert s.index[: like.ndim] == want[s.device], (path, s.index, want[s.device])


def assert_same_shards(a: jax.Array, b: jax.Array, path: str) -> None:
    """This process's shards of ``a`` and ``b``: the same devices, indices and bits."""
    sa = sorted(a.addressable_shards, key=lambda s: s.device.id)
    sb = sorted(b.addressable_shards, key=lambda s: s.device.id)
    assert [(s.device, s.index) for s in sa] == [(s.device, s.index) for s in sb], (
        path,
        a.sharding,
        b.sharding,
    )
    for x, y in zip(sa, sb, strict=True):
        np.testing.assert_array_equal(np.asarray(x.data), np.asarray(y.data), err_msg=path)


def host_and_device_runs(
    host: Any,
    dev: Any,
    mesh: jax.sharding.Mesh,
    steps: int,
    after: Callable[[Any], None] = lambda state: None,
) -> Any:
    """Both EMAs from the same parameters through ``steps`` jitted, donated updates (one
    program for the pair: one compilation), the host one's placement checked after
    ``init`` and after each update, then ``after(its state)``; returns the host state
    once its shards are checked equal to the device one's."""
    params = global_params(mesh, VALUES)
    sh, sd = host.init(params), dev.init(params)

    def check_placement(state: Any) -> None:
        memory_worker.assert_host_like(state, params, host.several)
        for k, e in state.ema.items():
            assert_own_shards(e, params[k], k)

    check_placement(sh)
    update = jax.jit(lambda p, a, b: (host.update(p, a), dev.update(p, b)), donate_argnums=(1, 2))
    for i in range(steps):
        sh, sd = update(global_params(mesh, numpy_trajectory(VALUES, i)), sh, sd)
        check_placement(sh)
        after(sh)
    assert int(sh.step) == steps
    for k in VALUES:
        assert_same_shards(sh.ema[k], sd.ema[k], k)
    return sh


def averages(name: str, mesh: jax.sharding.Mesh) -> None:
    """One schedule or two (memory_worker.SCHEDULES[name]) on the host and on the device."""
    schedule = memory_worker.SCHEDULES[name]
    host = ema_jax.ema(schedule, memory_kind="pinned_host")
    sh = host_and_device_runs(host, ema_jax.ema(schedule), mesh, STEPS)
    want = numpy_ema(name)
    for k in VALUES:
        for s in sh.ema[k].addressable_shards:
            got, ref = np.asarray(s.data), want[k][s.index]
            # float32 rounding of STEPS updates of values below 2 (support.fp32_tolerance)
            np.testing.assert_allclose(got, ref, rtol=0, atol=4 * STEPS * EPS32 * 2, err_msg=k)


def one_average(mesh: jax.sharding.Mesh, workdir: Path) -> None:
    averages("one", mesh)


def two_averages(mesh: jax.sharding.Mesh, workdir: Path) -> None:
    averages("two", mesh)


def posthoc_trackers(mesh: jax.sharding.Mesh, workdir: Path) -> None:
    """Post-hoc trackers in host memory: bit for bit the device ones; their snapshots,
    written by both processes, give back a tracked width whole."""
    host = posthoc.trackers(batch_size=4, memory_kind="pinned_host")
    with posthoc.Snapshots(workdir / "snapshots", snapshot_every=2) as snapshots:
        sh = host_and_device_runs(
            host,
            posthoc.trackers(batch_size=4),
            mesh,
            4,
            lambda state: snapshots.save(state, ema=host),
        )
        snapshots.wait_until_finished()
        assert snapshots.steps() == [2, 4], snapshots.steps()
    # A tracked width at the last snapshot gets all the weight (within 1e-9,
    # test_posthoc.py): the whole average, rounded to float32 (values below 2).
    got = posthoc.reconstruct(workdir / "snapshots", 0.1)
    j = host.index("0.1")
    for k in VALUES:
        for s in sh.ema[k].addressable_shards:
            want = np.asarray(s.data)[..., j]
            np.testing.assert_allclose(got[k][s.index[:-1]], want, rtol=0, atol=4 * EPS32)


def nnx_ema(mesh: jax.sharding.Mesh, workdir: Path) -> None:
    """``ema_jax.nnx.Ema`` of a model split over both processes: its averages stay pinned,
    with the model's spec, and equal the on-device ``Ema``'s bit for bit."""
    with jax.set_mesh(mesh):
        model = nnx.Linear(
            64,
            32,
            kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), ("data", "model")),
            bias_init=nnx.with_partitioning(nnx.initializers.ones_init(), ("model",)),
            rngs=nnx.Rngs(0),
        )
        host = Ema(model, ema_jax.ema(schedules.constant(0.9), memory_kind="pinned_host"))
        dev = Ema(model, ema_jax.ema(schedules.constant(0.9)))

        @nnx.jit(donate_argnums=(1, 2))
        def update(model: nnx.Linear, host: Ema, dev: Ema) -> None:
            host.update(model)
            dev.update(model)
            for v in (model.kernel, model.bias):  # the next step's weights
                v.set_value(v.get_value() * 0.9 + 0.05)

        for _ in range(3):
            update(model, host, dev)
    assert int(host.ema_state.step) == 3
    for k in ("kernel", "bias"):
        e, p = host.params[k].get_value(), getattr(model, k).get_value()
        assert e.sharding.memory_kind == "pinned_host", (k, e.sharding)
        assert e.sharding.spec == p.sharding.spec, (k, e.sharding, p.sharding)
        assert_own_shards(e, p, k)
        assert_same_shards(e, dev.params[k].get_value(), k)
        for a, b in zip(e.addressable_shards, p.addressable_shards, strict=True):
            assert not np.array_equal(np.asarray(a.data), np.asarray(b.data)), k  # it lags


def train_state_recipe(
    mesh: jax.sharding.Mesh, ema: Any, shift: float
) -> tuple[Callable[[], Any], Any]:
    """docs/scaling.md's way to a pod's state: ``create`` and its shardings, the EMA's
    leaves in pinned host memory, everything else (step counters too) global on ``mesh``."""

    def create() -> ema_jax.EmaTrainState:
        params = {k: jnp.asarray(v) + shift for k, v in VALUES.items() if k != "count"}
        return ema_jax.EmaTrainState.create(apply_fn=apply, params=params, tx=TX, ema=ema)

    def sharding(path: Any, leaf: Any) -> NamedSharding:
        keys = jax.tree_util.keystr(path)
        spec = SPECS[keys.rsplit("'", 2)[-2]] if leaf.ndim else P()
        out = NamedSharding(mesh, spec)
        return out.with_memory_kind("pinned_host") if "ema_state.ema" in keys else out

    return create, jax.tree_util.tree_map_with_path(sharding, jax.eval_shape(create))


def linen_checkpoint(mesh: jax.sharding.Mesh, workdir: Path) -> None:
    ema = ema_jax.ema(schedules.constant(0.9), memory_kind="pinned_host")
    create, shardings = train_state_recipe(mesh, ema, 0.0)
    state = jax.jit(create, out_shardings=shardings)()
    step = jax.jit(
        lambda s, g: s.apply_gradients(grads=g), donate_argnums=0, out_shardings=shardings
    )
    for i in range(3):
        grads = jax.tree.map(lambda p, i=i: jnp.full_like(p, 0.5 + i), state.params)
        state = step(state, grads)
    for k, e in state.ema_params.items():
        assert e.sharding.memory_kind == "pinned_host", (k, e.sharding)
        assert_own_shards(e, state.params[k], k)
    handler = ocp.StandardCheckpointHandler()
    with ocp.CheckpointManager(workdir / "ckpt", item_handlers=handler) as manager:
        assert ema_jax.save_checkpoint(manager, state)
        manager.wait_until_finished()
    # Restored into an abstract target on the same shardings (other values: what comes
    # back was read), in fresh managers as after a restart.
    create_other, _ = train_state_recipe(mesh, ema, 1.0)
    target = sharded.abstract_like(jax.eval_shape(create_other), shardings)
    handler = ocp.StandardCheckpointHandler()
    with ocp.CheckpointManager(workdir / "ckpt", item_handlers=handler) as manager:
        restored = ema_jax.restore_checkpoint(manager, target)
    assert int(restored.step) == int(restored.ema_state.step) == 3
    for k, e in restored.ema_params.items():
        assert e.sharding.memory_kind == "pinned_host", (k, e.sharding)
        assert restored.params[k].sharding.memory_kind == "device", k
        assert_own_shards(e, restored.params[k], k)
    flat = jax.tree_util.tree_flatten_with_path(restored)[0]
    for (path, a), b in zip(flat, jax.tree.leaves(state), strict=True):
        assert a.sharding.is_equivalent_to(b.sharding, a.ndim), (path, a.sharding, b.sharding)
        assert_same_shards(a, b, jax.tree_util.keystr(path))
    # The restored state trains on, its EMA still on the host.
    restored = step(restored, jax.tree.map(jnp.ones_like, restored.params))
    assert {e.sharding.memory_kind for e in restored.ema_params.values()} == {"pinned_host"}


def device_out_shardings_raise(mesh: jax.sharding.Mesh, workdir: Path) -> None:
    """The recipe with out_shardings that forget the memory kind: the EMA lands in device
    memory, and the update says so instead of keeping it there silently."""
    ema = ema_jax.ema(schedules.constant(0.9), memory_kind="pinned_host")
    create, shardings = train_state_recipe(mesh, ema, 0.0)
    on_device = jax.tree.map(lambda s: s.with_memory_kind("device"), shardings)
    state = jax.jit(create, out_shardings=on_device)()
    assert {e.sharding.memory_kind for e in state.ema_params.values()} == {"device"}
    step = jax.jit(lambda s, g: s.apply_gradients(grads=g), out_shardings=on_device)
    try:
        step(state, jax.tree.map(jnp.ones_like, state.params))
    except ValueError as error:
        assert "state.ema['params']['bias'] is in device memory" in str(error), error
        assert "with_memory_kind('pinned_host')" in str(error), error
    else:
        raise AssertionError("an EMA of memory_kind='pinned_host' in device memory updated")


CHECKS = (
    one_average,
    two_averages,
    posthoc_trackers,
    nnx_ema,
    linen_checkpoint,
    device_out_shardings_raise,
)


def main(phase: str, process_id: int, port: int, workdir: Path) -> None:
    assert phase == "memory", phase
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=2,
        process_id=process_id,
        initialization_timeout=600,  # see multihost_worker.py: not a budget for the work
        shutdown_timeout_seconds=600,
    )
    assert jax.process_count() == 2 and jax.device_count() == 8, jax.devices()
    assert jax.local_device_count() == 4, jax.local_devices()
    mesh = jax.make_mesh(*MESH)
    start = time.monotonic()
    for check in CHECKS:
        check(mesh, workdir)
        print(
            f"process {process_id}: {check.__name__} ok ({time.monotonic() - start:.1f} s)",
            flush=True,
        )
    print(f"process {process_id}: {phase} ok", flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))

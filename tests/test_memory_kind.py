"""A host-resident EMA (``memory_kind="pinned_host"``): where it lives, and its numbers.

On CPU the memory kinds are the same RAM, so what is checked is what can be: the
placement through init and jitted, donated updates (here and on 8 simulated devices
with the parameters' sharding, in support/memory_worker.py), bit-identity with the on-device
EMA, and the compiled update's memory analysis.
"""

from __future__ import annotations

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import SingleDeviceSharding
from support import check_device_result
from support import memory_worker
from support import run_device_worker
from support.models import Mlp
from support.models import batches
from support.models import make_state
from support.models import train_step

import ema_jax
from ema_jax import posthoc
from ema_jax import schedules

WORKER = Path(memory_worker.__file__)
PARAMS = {"w": jnp.arange(4096.0).reshape(64, 64) / 4096, "b": jnp.ones(8192), "n": jnp.int32(3)}


def kinds(tree) -> set[str]:
    return {x.sharding.memory_kind for x in jax.tree.leaves(tree)}


@pytest.mark.parametrize("name", list(memory_worker.SCHEDULES))
def test_a_pinned_host_ema_stays_there_and_equals_the_device_ema(name):
    host = ema_jax.ema(memory_worker.SCHEDULES[name], memory_kind="pinned_host")
    dev = ema_jax.ema(memory_worker.SCHEDULES[name])
    sh, sd = host.init(PARAMS), dev.init(PARAMS)
    assert kinds(sh.ema) == {"pinned_host"} and kinds(sd.ema) == {"device"}
    update_h = jax.jit(host.update, donate_argnums=1)
    update_d = jax.jit(dev.update, donate_argnums=1)
    for i in range(memory_worker.STEPS):
        params = memory_worker.trajectory(PARAMS, i)
        sh, sd = update_h(params, sh), update_d(params, sd)
        assert kinds(sh.ema) == {"pinned_host"}
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(sh), jax.device_get(sd))


@pytest.mark.parametrize("update_after", [0, 3])
def test_a_pinned_host_bema_keeps_all_three_buffers_there(update_after):
    # BEMA's output, its EMA and theta0 (the weights at the snapshot) all stay on the host.
    kw = {"update_period": 2, "update_after": update_after}
    host = ema_jax.bema(**kw, memory_kind="pinned_host")
    dev = ema_jax.bema(**kw)
    sh, sd = host.init(PARAMS), dev.init(PARAMS)
    buffers = ("ema", "mean", "theta0")
    assert all(kinds(getattr(sh, b)) == {"pinned_host"} for b in buffers)
    update_h = jax.jit(host.update, donate_argnums=1)
    update_d = jax.jit(dev.update, donate_argnums=1)
    for i in range(memory_worker.STEPS):
        params = memory_worker.trajectory(PARAMS, i)
        sh, sd = update_h(params, sh), update_d(params, sd)
        assert all(kinds(getattr(sh, b)) == {"pinned_host"} for b in buffers)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(sh), jax.device_get(sd))


def test_init_under_jit_and_device_memory_kind():
    host = ema_jax.ema(schedules.constant(0.9), memory_kind="pinned_host")
    assert kinds(jax.jit(host.init)(PARAMS).ema) == {"pinned_host"}
    assert kinds(ema_jax.ema(schedules.constant(0.9), memory_kind="device").init(PARAMS).ema) == {
        "device"
    }


def test_the_compiled_update_holds_no_ema_sized_temporary():
    """The bound: at most one leaf's blend in flight; on CPU XLA fuses it to nothing."""
    host = ema_jax.ema(schedules.constant(0.9), memory_kind="pinned_host")
    state = host.init(PARAMS)
    compiled = jax.jit(host.update, donate_argnums=1).lower(PARAMS, state).compile()
    memory = compiled.memory_analysis()
    largest = max(x.nbytes for x in jax.tree.leaves(state.ema))
    assert memory.temp_size_in_bytes < largest
    assert memory.alias_size_in_bytes >= sum(x.nbytes for x in jax.tree.leaves(state.ema))


@pytest.mark.slow
@pytest.mark.xdist_group("memory")  # one worker start per run
def test_on_8_simulated_devices(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("memory")
    results = run_device_worker(WORKER, [str(workdir)], workdir / "memory.json")
    for name in memory_worker.CHECKS:
        check_device_result(results, name)


BAD = [
    ("hbm", "memory_kind must be one of the memory kinds of the cpu backend"),
    ("unpinned_host", "memory_kind='unpinned_host' is not supported for an EMA"),
    (3, "memory_kind must be one of the memory kinds of the cpu backend"),
]


@pytest.mark.bad_input
@pytest.mark.parametrize(("kind", "text"), BAD, ids=["unknown", "unpinned", "int"])
def test_bad_memory_kind_lists_the_kinds_the_backend_has(kind, text):
    with pytest.raises(ValueError, match=re.escape(text)) as info:
        ema_jax.ema(schedules.constant(0.9), memory_kind=kind)
    if "backend" in text:
        assert "'device', 'pinned_host', 'unpinned_host'" in str(info.value)


def _moved(state, kind: str):
    """``state`` with every EMA-sized buffer moved to memory ``kind`` (its step kept)."""
    sharding = SingleDeviceSharding(jax.devices()[0], memory_kind=kind)
    fields = [f for f in ("ema", "mean", "theta0") if f in state._fields]
    return state._replace(**{f: jax.device_put(getattr(state, f), sharding) for f in fields})


@pytest.mark.bad_input
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_an_ema_outside_its_memory_kind_is_refused_not_kept_there(jit):
    # A state created under jax.jit with out_shardings that lack memory_kind lands in
    # device memory; an update traced with such out_shardings would keep it there.
    host = ema_jax.ema(schedules.constant(0.9), memory_kind="pinned_host")
    on_device = _moved(host.init(PARAMS), "device")
    update = jax.jit(host.update) if jit else host.update
    with pytest.raises(ValueError, match=re.escape("state.ema['b'] is in device memory")) as info:
        update(PARAMS, on_device)
    assert "with_memory_kind('pinned_host')" in str(info.value)
    dev = ema_jax.ema(schedules.constant(0.9), memory_kind="device")
    with pytest.raises(ValueError, match=re.escape("state.ema['b'] is in host memory")):
        dev.update(PARAMS, _moved(dev.init(PARAMS), "pinned_host"))


@pytest.mark.bad_input
def test_a_bema_outside_its_memory_kind_names_the_buffer():
    host = ema_jax.bema(update_period=2, memory_kind="pinned_host")
    state = host.init(PARAMS)
    theta0 = jax.device_put(state.theta0, SingleDeviceSharding(jax.devices()[0]))
    with pytest.raises(ValueError, match=re.escape("state.theta0['b'] is in device memory")):
        host.update(PARAMS, state._replace(theta0=theta0))
    with pytest.raises(ValueError, match=re.escape("state.ema['b'] is in device memory")):
        host.update(PARAMS, _moved(state, "device"))


def _trained(ema, steps: int = 6):
    state = make_state(Mlp(), ema)
    step = jax.jit(train_step, donate_argnums=0)
    for x, y in batches(steps):
        state, _ = step(state, x, y)
    return state


def test_a_pinned_host_ema_is_checkpointed_and_restored_onto_the_host(tmp_path):
    host = ema_jax.ema(schedules.constant(0.9), memory_kind="pinned_host")
    state = _trained(host)
    assert kinds(state.ema_state.ema) == {"pinned_host"}
    with ocp.CheckpointManager(tmp_path, item_handlers=ocp.StandardCheckpointHandler()) as m:
        ema_jax.save_checkpoint(m, state)
        m.wait_until_finished()
        restored = ema_jax.restore_checkpoint(m, make_state(Mlp(), host, seed=1))
    assert kinds(restored.ema_state.ema) == {"pinned_host"}
    assert kinds(restored.params) == {"device"}
    got, want = (restored.params, restored.ema_state), (state.params, state.ema_state)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(got), jax.device_get(want))


def test_pinned_host_posthoc_trackers_snapshot_and_reconstruct_as_on_device(tmp_path):
    results = {}
    for kind in ("pinned_host", None):
        trackers = posthoc.trackers(batch_size=4, memory_kind=kind)
        state = make_state(Mlp(), trackers)
        snapshots = posthoc.Snapshots(tmp_path / str(kind), snapshot_every=2)
        step = jax.jit(train_step, donate_argnums=0)
        for x, y in batches(8):
            state, _ = step(state, x, y)
            snapshots.save(state)
        snapshots.close()
        want = {"pinned_host"} if kind else {"device"}
        assert kinds(state.ema_state.ema) == want
        results[kind] = posthoc.reconstruct(tmp_path / str(kind), 0.1)  # a tracked width
    jax.tree.map(np.testing.assert_array_equal, results["pinned_host"], results[None])

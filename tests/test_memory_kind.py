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
import pytest
from support import check_device_result
from support import memory_worker
from support import run_device_worker

import ema_jax
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

"""A host-resident EMA on 8 simulated CPU devices: test_memory_kind.py runs this in a subprocess.

Run as ``python tests/support/memory_worker.py WORKDIR`` with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``. It runs every check and writes
WORKDIR/memory.json: ``{check: "ok" | traceback}``.
"""

from __future__ import annotations

import json
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import ema_jax
from ema_jax import schedules
from ema_jax.nnx import Ema

CHECKS: dict[str, Callable[[], None]] = {}
STEPS = 20
SCHEDULES = {
    "one": schedules.constant(0.9),
    "two": (
        schedules.constant(0.9),
        schedules.pycls(ema_alpha=1e-3, batch_size=64, max_epoch=1, update_period=2),
    ),
}


def check(fn: Callable[[], None]) -> Callable[[], None]:
    CHECKS[fn.__name__] = fn
    return fn


def sharded_params() -> tuple[Any, jax.sharding.Mesh]:
    mesh = jax.make_mesh((4, 2), ("data", "model"))
    specs = {"kernel": P("data", "model"), "bias": P("model"), "scale": P(), "count": P()}
    values = {
        "kernel": jnp.arange(64 * 32, dtype=jnp.float32).reshape(64, 32) / 2048,
        "bias": jnp.linspace(-1, 1, 32, dtype=jnp.float32),
        "scale": jnp.ones(16, jnp.float32),
        "count": jnp.int32(0),
    }
    placed = {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in values.items()}
    return placed, mesh


def trajectory(params: Any, i: int) -> Any:
    return jax.tree.map(lambda x: x + i if x.dtype == jnp.int32 else x * 0.9 + 0.01 * i, params)


def assert_host_like(state: Any, params: Any, several: bool) -> None:
    for (path, e), p in zip(
        jax.tree_util.tree_flatten_with_path(state.ema)[0], jax.tree.leaves(params), strict=True
    ):
        assert e.sharding.memory_kind == "pinned_host", (path, e.sharding)
        want = p.sharding.with_memory_kind("pinned_host")
        got = e.sharding
        assert got.mesh == want.mesh and got.memory_kind == want.memory_kind, (path, got)
        # The same spec over the parameter's axes (several averages add a replicated one).
        spec = tuple(got.spec) + (None,) * (e.ndim - len(got.spec))
        want_spec = tuple(want.spec) + (None,) * (e.ndim - len(want.spec))
        assert spec == want_spec, (path, got.spec, want.spec)
        if not several:
            assert e.sharding.is_equivalent_to(want, e.ndim), (path, got, want)


def host_and_device_runs(name: str) -> None:
    params, _ = sharded_params()
    host = ema_jax.ema(SCHEDULES[name], memory_kind="pinned_host")
    dev = ema_jax.ema(SCHEDULES[name])
    sh, sd = host.init(params), dev.init(params)
    assert_host_like(sh, params, host.several)
    update_h = jax.jit(host.update, donate_argnums=1)
    update_d = jax.jit(dev.update, donate_argnums=1)
    for i in range(STEPS):
        p = trajectory(params, i)
        sh, sd = update_h(p, sh), update_d(p, sd)
        assert_host_like(sh, params, host.several)
    assert int(sh.step) == STEPS
    for (path, a), b in zip(
        jax.tree_util.tree_flatten_with_path(sh.ema)[0], jax.tree.leaves(sd.ema), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path))


@check
def one_average_stays_pinned_with_the_params_sharding_and_equals_the_device_ema() -> None:
    host_and_device_runs("one")


@check
def two_averages_stay_pinned_with_the_params_sharding_and_equal_the_device_ema() -> None:
    host_and_device_runs("two")


@check
def ema_train_state_keeps_its_ema_pinned() -> None:
    params, _ = sharded_params()
    params = {k: v for k, v in params.items() if k != "count"}
    ema = ema_jax.ema(schedules.constant(0.9), memory_kind="pinned_host")
    state = ema_jax.EmaTrainState.create(
        apply_fn=lambda p, x: x, params=params, tx=optax.sgd(0.1), ema=ema
    )
    step = jax.jit(lambda s, g: s.apply_gradients(grads=g), donate_argnums=0)
    for _ in range(3):
        state = step(state, jax.tree.map(jnp.ones_like, params))
    for leaf in jax.tree.leaves(state.ema_state.ema):
        assert leaf.sharding.memory_kind == "pinned_host", leaf.sharding
    for leaf in jax.tree.leaves(state.params):
        assert leaf.sharding.memory_kind == "device", leaf.sharding


@check
def nnx_ema_keeps_its_averages_pinned() -> None:
    mesh = jax.make_mesh((8,), ("model",))
    with jax.set_mesh(mesh):
        model = nnx.Linear(
            4,
            16,
            kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), (None, "model")),
            rngs=nnx.Rngs(0),
        )
        ema = Ema(model, ema_jax.ema(schedules.constant(0.9), memory_kind="pinned_host"))

        @nnx.jit(donate_argnums=1)
        def update(model, ema):
            ema.update(model)

        for _ in range(3):
            update(model, ema)
    kernel = ema.params["kernel"].get_value()
    assert kernel.sharding.memory_kind == "pinned_host", kernel.sharding
    assert kernel.sharding.spec == model.kernel.get_value().sharding.spec, kernel.sharding
    assert int(ema.ema_state.step) == 3


def main(workdir: Path) -> None:
    assert jax.device_count() == 8, f"needs 8 devices, got {jax.devices()}"
    results = {}
    for name, fn in CHECKS.items():
        try:
            fn()
            results[name] = "ok"
        except Exception:
            results[name] = traceback.format_exc()
    (workdir / "memory.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))

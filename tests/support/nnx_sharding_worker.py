"""`ema_jax.nnx.Ema` on 8 simulated CPU devices: test_nnx_sharding.py runs this in a subprocess.

Run as ``python tests/support/nnx_sharding_worker.py WORKDIR`` with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``. It runs every check and writes
WORKDIR/nnx_sharding.json: ``{check: "ok" | traceback}``.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from collections import Counter
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
from ema_jax.nnx import Ema
from support import sharded
from support.sharding_worker import all_reduce_operand_shapes

CHECKS: dict[str, Callable[[Path], None]] = {}
STEPS = 3


def check(fn: Callable[[Path], None]) -> Callable[[Path], None]:
    CHECKS[fn.__name__] = fn
    return fn


def transform(**kwargs: Any) -> ema_jax.NormalizedEma:
    # count_nonfinite=False: the guard without its count, as the coming default "skip".
    hyper = dict(ema_alpha=0.05, batch_size=16, max_epoch=2, update_period=2)
    return ema_jax.normalized_ema(**(hyper | {"count_nonfinite": False} | kwargs))


class Net(nnx.Module):
    """Linear -> BatchNorm -> relu -> Linear with tensor- and data-parallel annotations.

    No trailing None in a spec: outputs come back in the short spelling, and jit's
    cache tells the two apart.
    """

    def __init__(self, rngs: nnx.Rngs, param_dtype: Any = jnp.float32):
        init = nnx.initializers.lecun_normal()
        zeros, ones = nnx.initializers.zeros, nnx.initializers.ones
        self.l1 = nnx.Linear(
            sharded.IN,
            sharded.HIDDEN,
            kernel_init=nnx.with_partitioning(init, ("data", "model")),
            bias_init=nnx.with_partitioning(zeros, ("model",)),
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.bn = nnx.BatchNorm(
            sharded.HIDDEN,
            momentum=0.9,
            scale_init=nnx.with_partitioning(ones, ("model",)),
            bias_init=nnx.with_partitioning(zeros, ("model",)),
            param_dtype=param_dtype,
            rngs=rngs,
        )
        # nnx.BatchNorm takes no annotation for its statistics: without one they start
        # replicated and come out of the first step split like the features, and the
        # step compiles twice (EMA or not).
        for name in ("mean", "var"):
            stat = getattr(self.bn, name)
            setattr(self.bn, name, nnx.BatchStat(stat.get_value(), out_sharding=("model",)))
        self.l2 = nnx.Linear(
            sharded.HIDDEN,
            sharded.OUT,
            kernel_init=nnx.with_partitioning(init, ("model",)),
            param_dtype=param_dtype,
            rngs=rngs,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.l2(nnx.relu(self.bn(self.l1(x))))


def mesh() -> jax.sharding.Mesh:
    return sharded.make_mesh(sharded.LAYOUTS["tensor_parallel"])  # (2, 4): data, model


def setup(ema: Any, param_dtype: Any = jnp.float32) -> tuple[Net, nnx.Optimizer, Ema]:
    with jax.set_mesh(mesh()):
        model = Net(nnx.Rngs(0), param_dtype=param_dtype)
        optimizer = nnx.Optimizer(model, optax.sgd(0.1, momentum=0.9), wrt=nnx.Param)
    return model, optimizer, Ema(model, ema)  # built outside the mesh context on purpose


def assert_follows(model: Net, ema: Ema, what: str) -> None:
    model_vars = dict(nnx.to_flat_state(nnx.state(model)))
    pairs = list(nnx.to_flat_state(ema.params))
    assert len(pairs) == len(model_vars), what
    for path, e in pairs:
        got, want = e.get_value(), model_vars[path].get_value()
        assert got.sharding.is_equivalent_to(want.sharding, got.ndim), (what, path, got, want)
        assert e.get_metadata().get("out_sharding") == model_vars[path].get_metadata().get(
            "out_sharding"
        )


def train_step(model: Net, optimizer: nnx.Optimizer, ema: Ema | None, x, y) -> jax.Array:
    def loss_fn(model: Net) -> jax.Array:
        return jnp.mean((model(x) - y) ** 2)

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    if ema is not None:
        ema.update(model)
    return loss


def batch(i: int) -> tuple[jax.Array, ...]:
    return sharded.global_batch(i, mesh(), P("data"))


@check
def ema_variables_sit_on_the_models_shardings(path: Path) -> None:
    model, _, ema = setup(transform())
    assert model.l1.kernel.get_value().sharding.spec == P("data", "model")
    assert_follows(model, ema, "fp32")
    # The counters replicated on the same mesh: the first step then returns them where
    # they already are, and the step compiles once.
    for counter in (ema.step, ema.nonfinite_updates):
        assert counter.get_value().sharding.is_equivalent_to(NamedSharding(mesh(), P()), 0)
    model, _, ema = setup(transform(ema_dtype=jnp.float32), param_dtype=jnp.bfloat16)
    assert model.l1.kernel.get_value().dtype == jnp.bfloat16
    assert ema.params["l1"]["kernel"].get_value().dtype == jnp.float32
    assert_follows(model, ema, "fp32 EMA of bf16")


@check
def compiled_update_has_no_collectives(path: Path) -> None:
    model, _, ema = setup(transform())
    update = nnx.jit(lambda ema, model: ema.update(model), donate_argnums=(0, 1))
    hlo = update.lower(ema, model).compile().as_text()
    assert sharded.collectives(hlo) == [], sharded.collectives(hlo)
    # With today's counting guard: only scalar all-reduces, never a gathered parameter.
    model, _, ema = setup(transform(count_nonfinite=True))
    hlo = update.lower(ema, model).compile().as_text()
    assert set(sharded.collectives(hlo)) <= {"all-reduce"}, sharded.collectives(hlo)
    shapes = all_reduce_operand_shapes(hlo)
    assert all(shape.endswith("[]") for shape in shapes), shapes


@check
def train_step_adds_no_collectives_and_compiles_once(path: Path) -> None:
    model, optimizer, ema = setup(transform())
    x, y = batch(0)
    step = nnx.jit(train_step, donate_argnums=(0, 1, 2))
    plain = nnx.jit(train_step, donate_argnums=(0, 1), static_argnums=2)
    mine = sharded.collectives(step.lower(model, optimizer, ema, x, y).compile().as_text())
    base = sharded.collectives(plain.lower(model, optimizer, None, x, y).compile().as_text())
    assert Counter(mine) == Counter(base), (Counter(mine), Counter(base))
    traces = []

    def counting(*args: Any) -> jax.Array:
        traces.append(1)
        return train_step(*args)

    step = nnx.jit(counting, donate_argnums=(0, 1, 2))
    for i in range(STEPS):
        step(model, optimizer, ema, *batch(i))
    assert len(traces) == 1, len(traces)
    assert int(ema.ema_state.step) == STEPS
    assert_follows(model, ema, f"after {STEPS} steps")


@check
def checkpoint_restores_onto_the_shardings_in_the_metadata(path: Path) -> None:
    model, optimizer, ema = setup(transform())
    step = nnx.jit(train_step, donate_argnums=(0, 1, 2))
    for i in range(STEPS):
        step(model, optimizer, ema, *batch(i))
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path / "ema", nnx.state(ema))
    checkpointer.wait_until_finished()
    with jax.set_mesh(mesh()):
        abstract = nnx.eval_shape(lambda: Ema(Net(nnx.Rngs(0)), transform()))
    graphdef, target = nnx.split(abstract)
    # The EMA's variables carry the model's sharding annotations: read every array
    # straight onto its devices.
    shardings = nnx.get_named_sharding(target, mesh())
    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), target, shardings
    )
    restored = nnx.merge(graphdef, checkpointer.restore(path / "ema", target))
    checkpointer.close()
    assert int(restored.ema_state.step) == STEPS
    assert_follows(model, restored, "restored")
    for (p, got), (_, want) in zip(
        nnx.to_flat_state(nnx.state(restored)), nnx.to_flat_state(nnx.state(ema)), strict=True
    ):
        np.testing.assert_array_equal(
            np.asarray(got.get_value()), np.asarray(want.get_value()), err_msg=str(p)
        )


def main(workdir: Path) -> None:
    assert jax.device_count() == 8, f"needs 8 devices, got {jax.devices()}"
    results = {}
    for name, fn in CHECKS.items():
        start = time.perf_counter()
        try:
            fn(workdir)
            results[name] = "ok"
        except Exception:
            results[name] = traceback.format_exc()
        print(f"{name}: {time.perf_counter() - start:.1f} s", flush=True)
    (workdir / "nnx_sharding.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))

"""NNX precise BatchNorm statistics on 8 simulated CPU devices: test_nnx_precise_bn.py runs this.

Run as ``python tests/support/nnx_precise_bn_worker.py OUT.json`` with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``; writes ``{check: "ok" |
traceback}``. Also the home of the NNX test model, the twin of precise_bn_worker's
linen ``TwoBn``, checked against that module's NumPy reference (importing this module
starts no devices).
"""

from __future__ import annotations

import json
import sys
import traceback
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ema_jax import nnx as ema_nnx
from support.precise_bn_worker import EPS_BLOCK
from support.precise_bn_worker import EPS_INPUT
from support.precise_bn_worker import numpy_stats
from support.precise_bn_worker import stats_bound


class Block(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, axis_name: str | None = None):
        self.lin = nnx.Linear(18, 6, rngs=rngs)
        self.bn = nnx.BatchNorm(6, momentum=0.99, epsilon=EPS_BLOCK, axis_name=axis_name, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.bn(self.lin(x))


class TwoBn(nnx.Module):
    """A BatchNorm over (batch, height, width) of the input, then one in a submodule."""

    def __init__(self, rngs: nnx.Rngs, axis_name: str | None = None):
        self.input_bn = nnx.BatchNorm(
            2, momentum=0.9, epsilon=EPS_INPUT, axis_name=axis_name, rngs=rngs
        )
        self.block = Block(rngs, axis_name)
        self.head = nnx.Linear(6, 2, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.input_bn(x)
        return self.head(nnx.relu(self.block(x.reshape(x.shape[0], -1))))


def setup(
    batch: int = 16, num_batches: int = 4, axis_name: str | None = None
) -> tuple[TwoBn, list[np.ndarray]]:
    """TwoBn with every parameter and statistic perturbed, and ``num_batches`` inputs."""
    x = np.random.default_rng(0).normal(0.5, 2.0, (num_batches, batch, 3, 3, 2))
    model = TwoBn(nnx.Rngs(1), axis_name)
    rng = np.random.default_rng(2)
    for _, variable in nnx.to_flat_state(nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))):
        value = np.asarray(variable.get_value())
        variable.set_value((value + 0.3 * rng.normal(size=value.shape)).astype(np.float32))
    return model, list(x.astype(np.float32))


def linen_params(model: TwoBn) -> dict[str, Any]:
    """The weights in the layout of precise_bn_worker's NumPy reference."""
    bn, lin = nnx.as_pure(nnx.state(model.input_bn)), nnx.as_pure(nnx.state(model.block.lin))
    params = {
        "input_bn": {"scale": bn["scale"], "bias": bn["bias"]},
        "block": {"Dense_0": {"kernel": lin["kernel"], "bias": lin["bias"]}},
    }
    return {"params": jax.tree.map(np.asarray, params)}


def check_against_numpy(got: nnx.State, model: TwoBn, xs: list[np.ndarray]) -> None:
    """``got``'s statistics are the NumPy means within their float32 error bounds."""
    per_batch = [numpy_stats(linen_params(model), x) for x in xs]
    for name, node in (("input_bn", got["input_bn"]), ("block/bn", got["block"]["bn"])):
        for stat in ("mean", "var"):
            variable = node[stat]
            assert type(variable) is nnx.BatchStat, type(variable)
            want = np.mean([b[name][stat] for b in per_batch], axis=0)
            bound = stats_bound(per_batch, name, stat, len(xs))
            err = np.abs(np.asarray(variable.get_value(), np.float64) - want).max()
            assert err <= bound, f"{name} {stat}: error {err:.3g} > bound {bound:.3g}"


CHECKS: dict[str, Callable[[], None]] = {}


def check(fn: Callable[[], None]) -> Callable[[], None]:
    CHECKS[fn.__name__] = fn
    return fn


MESH: jax.sharding.Mesh | None = None


@check
def jit_over_sharded_batches_equals_one_device() -> None:
    """XLA reduces BatchNorm over the global batch: the device count does not matter."""
    assert MESH is not None and MESH.size == 8
    model, xs = setup()
    one = jax.devices()[0]
    single = ema_nnx.precise_batch_stats(model, [jax.device_put(x, one) for x in xs])
    graphdef, state = nnx.split(model)
    replicated = nnx.merge(graphdef, jax.device_put(state, NamedSharding(MESH, P())))
    sharded = [jax.device_put(x, NamedSharding(MESH, P("data"))) for x in xs]
    assert len(sharded[0].sharding.device_set) == 8
    multi = ema_nnx.precise_batch_stats(replicated, sharded)
    check_against_numpy(single, model, xs)
    check_against_numpy(multi, model, xs)
    assert jax.tree.structure(multi) == jax.tree.structure(single)
    for (path, a), (_, b) in zip(nnx.to_flat_state(multi), nnx.to_flat_state(single), strict=True):
        # One reduction order against another: a few float32 roundings of the values.
        scale = float(np.abs(np.asarray(b.get_value())).max())
        diff = np.abs(np.asarray(a.get_value()) - np.asarray(b.get_value())).max()
        assert diff <= 64 * 2.0**-24 * max(scale, 1.0), (path, diff)


class ShardMapped(nnx.Module):
    """TwoBn with ``axis_name="data"`` run under ``nnx.shard_map``: 1/8 of the batch each."""

    def __init__(self, inner: TwoBn):
        self.inner = inner

    def __call__(self, x: jax.Array) -> jax.Array:
        run = nnx.shard_map(
            lambda model, x: model(x),
            mesh=MESH,
            in_specs=(P(), P("data")),
            out_specs=P("data"),
        )
        return run(self.inner, x)


@check
def layer_axis_name_under_shard_map_equals_one_device() -> None:
    """A layer with ``axis_name`` averages over that axis: again the global batch."""
    model, xs = setup(axis_name="data")
    got = ema_nnx.precise_batch_stats(ShardMapped(model), xs)
    check_against_numpy(got["inner"], model, xs)


def main(out: str) -> None:
    global MESH
    MESH = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    results = {}
    for name, fn in CHECKS.items():
        try:
            fn()
            results[name] = "ok"
        except Exception:
            results[name] = traceback.format_exc()
    with open(out, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1])

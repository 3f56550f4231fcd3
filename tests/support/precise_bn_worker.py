"""Precise BatchNorm statistics on 8 simulated CPU devices: test_precise_bn.py runs this.

Run as ``python tests/support/precise_bn_worker.py OUT.json`` with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``; writes ``{check: "ok" |
traceback}``. Also the home of the test model and its NumPy reference, which
test_precise_bn.py imports (importing this module starts no devices).
"""

from __future__ import annotations

import json
import sys
import traceback
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import ema_jax

U = 2.0**-24  # float32 unit roundoff
EPS_INPUT, EPS_BLOCK = 1e-5, 1e-3  # the two layers' epsilon


class Block(nn.Module):
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = nn.Dense(6)(x)
        return nn.BatchNorm(
            use_running_average=not train,
            momentum=0.99,
            epsilon=EPS_BLOCK,
            axis_name=self.axis_name,
            name="bn",
        )(x)


class TwoBn(nn.Module):
    """A BatchNorm over (batch, height, width) of the input, then one in a submodule."""

    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        x = nn.BatchNorm(
            use_running_average=not train,
            momentum=0.9,
            epsilon=EPS_INPUT,
            axis_name=self.axis_name,
            name="input_bn",
        )(x)
        x = Block(self.axis_name, name="block")(x.reshape(x.shape[0], -1), train)
        return nn.Dense(2)(nn.relu(x))


def numpy_stats(variables: dict[str, Any], x: np.ndarray) -> dict[str, dict[str, Any]]:
    """TwoBn's batch statistics on one batch, in float64, with float32 error bounds.

    Returns ``{"input_bn" | "block/bn": {"mean", "var", "mean_err", "var_err"}}``:
    the biased batch variance (flax's convention) and, for each statistic, a bound
    on the error of flax's float32 computation of it, from the standard bound
    ``N * u * sum |terms|`` on a float32 sum of N terms (Higham's gamma_N):
    - input_bn over N = B*H*W entries: mean within ``N u max|x|``; the fast variance
      ``E[x^2] - E[x]^2`` within ``3 N u max x^2``.
    - normalising with ``rsqrt(var + eps)`` then has relative error at most
      ``var_err / (2 (var + eps)) + 4u``, carried into block/bn's input f;
    - block/bn's pre-activation ``h = f K + b`` (K rows) is off by at most
      ``A (rel_f + K u)`` with ``A = max(|f| |K| + |b|)``; its mean over B rows adds
      ``B u A``, its variance ``2 A dh + 3 B u A^2``.
    """
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
    x = np.asarray(x, np.float64)
    n0 = x.shape[0] * x.shape[1] * x.shape[2]
    m0, v0 = x.mean((0, 1, 2)), x.var((0, 1, 2))
    m0_err = n0 * U * np.abs(x).max()
    v0_err = 3 * n0 * U * (x**2).max()
    f = (x - m0) / np.sqrt(v0 + EPS_INPUT) * p["input_bn"]["scale"] + p["input_bn"]["bias"]
    f = f.reshape(x.shape[0], -1)
    rel_f = v0_err / (2 * (v0.min() + EPS_INPUT)) + 4 * U
    kernel, bias = p["block"]["Dense_0"]["kernel"], p["block"]["Dense_0"]["bias"]
    h = f @ kernel + bias
    a = (np.abs(f) @ np.abs(kernel) + np.abs(bias)).max()
    dh = a * (rel_f + kernel.shape[0] * U)
    b = x.shape[0]
    return {
        "input_bn": {"mean": m0, "var": v0, "mean_err": m0_err, "var_err": v0_err},
        "block/bn": {
            "mean": h.mean(0),
            "var": h.var(0),
            "mean_err": dh + b * U * a,
            "var_err": 2 * a * dh + 3 * b * U * a**2,
        },
    }


def stats_bound(per_batch: list[dict[str, Any]], name: str, stat: str, used: int) -> float:
    """The bound for the mean over ``used`` batches: the worst batch's, plus the sum's."""
    worst = max(b[name][f"{stat}_err"] for b in per_batch)
    biggest = max(np.abs(b[name][stat]).max() for b in per_batch)
    return worst + used * U * biggest


def setup(batch: int = 16, num_batches: int = 4) -> tuple[dict[str, Any], list[np.ndarray]]:
    x = np.random.default_rng(0).normal(0.5, 2.0, (num_batches, batch, 3, 3, 2))
    x = x.astype(np.float32)
    variables = jax.device_get(TwoBn().init(jax.random.key(1), x[0]))
    rng = np.random.default_rng(2)
    variables = jax.tree.map(
        lambda a: (a + 0.3 * rng.normal(size=a.shape)).astype(np.float32), variables
    )
    return variables, list(x)


def check_against_numpy(got: Any, variables: dict[str, Any], xs: list[np.ndarray]) -> None:
    per_batch = [numpy_stats(variables, x) for x in xs]
    for name, node in (("input_bn", got["input_bn"]), ("block/bn", got["block"]["bn"])):
        for stat in ("mean", "var"):
            want = np.mean([b[name][stat] for b in per_batch], axis=0)
            bound = stats_bound(per_batch, name, stat, len(xs))
            err = np.abs(np.asarray(node[stat], np.float64) - want).max()
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
    variables, xs = setup()
    one = jax.devices()[0]
    single = ema_jax.precise_batch_stats(
        TwoBn().apply, jax.device_put(variables, one), [jax.device_put(x, one) for x in xs]
    )
    batch_sharding = NamedSharding(MESH, P("data"))
    replicated = jax.device_put(variables, NamedSharding(MESH, P()))
    sharded = [jax.device_put(x, batch_sharding) for x in xs]
    assert len(sharded[0].sharding.device_set) == 8
    multi = ema_jax.precise_batch_stats(TwoBn().apply, replicated, sharded)
    check_against_numpy(single, variables, xs)
    check_against_numpy(multi, variables, xs)
    assert jax.tree.structure(multi) == jax.tree.structure(single)


def shard_mapped_apply(variables: Any, x: jax.Array, **kwargs: Any) -> Any:
    """TwoBn with ``axis_name="data"``, each device holding 1/8 of the batch."""

    def local(variables: Any, x: jax.Array) -> Any:
        return TwoBn(axis_name="data").apply(variables, x, **kwargs)

    return jax.shard_map(local, mesh=MESH, in_specs=(P(), P("data")), out_specs=(P("data"), P()))(
        variables, x
    )


@check
def layer_axis_name_under_shard_map_equals_one_device() -> None:
    """A layer with ``axis_name`` averages over that axis: again the global batch."""
    variables, xs = setup()
    got = ema_jax.precise_batch_stats(shard_mapped_apply, variables, xs)
    check_against_numpy(got, variables, xs)


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

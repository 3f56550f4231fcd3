"""The NaN/Inf guard's count sees every kind of non-finite entry, in every leaf.

The first call of a run always updates (step 0), whatever the period.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ema_jax
from ema_jax import schedules

KINDS = {"nan": np.nan, "+inf": np.inf, "-inf": -np.inf}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
# From 4096 float32 entries on, XLA:CPU's jnp.max ignores NaN: both sides of that.
@pytest.mark.parametrize("size", [3, 4095, 4096, 10_000])
@pytest.mark.parametrize("kind", [*sorted(KINDS), "all -inf", None])
@pytest.mark.parametrize("period", [1, 32])
def test_count_sees_nan_and_both_infinities(dtype, size, kind, period):
    ema = ema_jax.normalized_ema(ema_alpha=1e-2, batch_size=10, max_epoch=1, update_period=period)
    other = {"w": jnp.ones((5,), dtype)}  # a clean leaf beside the poisoned one
    values = np.linspace(-3e3, 3e3, size).astype(np.float32)
    if kind == "all -inf":
        values[:] = -np.inf
    elif kind is not None:
        values[size // 2] = KINDS[kind]
    params = {"p": jnp.asarray(values, dtype), **other}
    state = ema.init(jax.tree.map(jnp.zeros_like, params))
    state = jax.jit(ema.update)(params, state)
    assert int(state.nonfinite_updates) == (kind is not None)
    assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(state.ema))


@pytest.mark.parametrize("period", [1, 32])
def test_largest_finite_values_are_not_counted(period):
    ema = ema_jax.normalized_ema(ema_alpha=1e-2, batch_size=10, max_epoch=1, update_period=period)
    for dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
        info = jnp.finfo(dtype)
        for size in (2, 5000):
            p = jnp.full((size,), info.max, dtype).at[0].set(info.min)
            state = jax.jit(ema.update)({"p": p}, ema.init({"p": jnp.zeros_like(p)}))
            assert int(state.nonfinite_updates) == 0


# --------------------------------------------- the guard's select, as XLA compiles it

_NAMED = re.compile(
    r"^\s+(?:ROOT )?%(?P<name>\S+) = \S+ (?P<op>[a-z][a-z0-9-]*)\((?P<args>[^)]*)\)"
)


@pytest.mark.parametrize(
    ("ema", "dtype"),
    [
        (ema_jax.ema(schedules.pycls(ema_alpha=1e-5, batch_size=128, max_epoch=200)), "float32"),
        (ema_jax.ema(schedules.constant(0.999)), "float32"),
        (ema_jax.ema((schedules.constant(0.99), schedules.constant(0.999))), "float32"),
        (ema_jax.ema(schedules.warmup_power()), "float32"),
        (ema_jax.ema(schedules.constant(0.99), rounding="stochastic"), "bfloat16"),
    ],
    ids=["pycls", "constant", "two averages", "traced alpha", "bf16 stochastic"],
)
def test_the_guard_never_selects_the_old_ema_buffer_itself(ema, dtype):
    """``where(finite, new, ema)`` into the donated buffer is a masked store on XLA:CPU.

    LLVM turns a store of ``select(m, new, load(p))`` back into ``p`` into
    ``vmaskmovps``, several times slower than a plain store on x86 (benchmarks/README.md).
    The guard selects ``ema + (ema - ema)`` instead: equal for finite entries, but no
    load of the destination that LLVM can prove.
    """
    params = {"w": jnp.ones((64, 128), dtype), "b": jnp.ones(8192, dtype)}
    state = ema.init(params)
    hlo = jax.jit(ema.update, donate_argnums=1).lower(params, state).compile().as_text()
    selects = 0
    for block in hlo.split("\n\n"):
        ops = {m["name"]: m["op"] for m in map(_NAMED.match, block.splitlines()) if m}
        for m in filter(None, map(_NAMED.match, block.splitlines())):
            if m["op"] != "select" or not any(d in block for d in ("[64,128", "[8192")):
                continue
            operands = [a.strip().lstrip("%") for a in m["args"].split(",")]
            if ops.get(operands[1]) == "parameter" and ops.get(operands[2]) == "parameter":
                continue  # the copy branch: parameters or the EMA, both read anyway
            selects += 1
            assert ops.get(operands[2]) != "parameter", (m.group(0), block)
    assert selects >= 2  # the guard's select is there, in each leaf's fusion

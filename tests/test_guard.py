"""The NaN/Inf guard's count sees every kind of non-finite entry, in every leaf.

The first call of a run always updates (step 0), whatever the period.
"""

from __future__ import annotations

import dataclasses
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


GUARDED = [
    (ema_jax.ema(schedules.pycls(ema_alpha=1e-5, batch_size=128, max_epoch=200)), "float32"),
    (ema_jax.ema(schedules.constant(0.999)), "float32"),
    (ema_jax.ema((schedules.constant(0.99), schedules.constant(0.999))), "float32"),
    (ema_jax.ema(schedules.warmup_power()), "float32"),
    (ema_jax.ema(schedules.constant(0.99), rounding="stochastic"), "bfloat16"),
]
GUARDED_IDS = ["pycls", "constant", "two averages", "traced alpha", "bf16 stochastic"]


def _defs(block: str) -> dict[str, tuple[str, list[str]]]:
    """``name -> (opcode, operand names)`` for the named instructions of one HLO block."""
    out = {}
    for m in filter(None, map(_NAMED.match, block.splitlines())):
        out[m["name"]] = (m["op"], [a.strip().lstrip("%") for a in m["args"].split(",")])
    return out


def _through_converts(defs: dict[str, tuple[str, list[str]]], name: str) -> str:
    while defs.get(name, ("",))[0] == "convert":
        name = defs[name][1][0]
    return name


def _guard_selects(ema, dtype):
    """The guard's select in each leaf's fusion of the compiled donated update.

    The select that gives a fusion its result (through converts), when its predicate is
    a finiteness test (stochastic rounding has a select of its own before it).
    """
    params = {"w": jnp.ones((64, 128), dtype), "b": jnp.ones(8192, dtype)}
    state = ema.init(params)
    hlo = jax.jit(ema.update, donate_argnums=1).lower(params, state).compile().as_text()
    for block in hlo.split("\n\n"):
        root = re.search(r"^\s+ROOT %(\S+) =", block, re.MULTILINE)
        if root is None or not any(d in block for d in ("[64,128", "[8192")):
            continue
        defs = _defs(block)
        name = _through_converts(defs, root[1])
        op, operands = defs.get(name, ("tuple", []))  # (a tuple's type does not parse)
        if op != "select" or all(defs[x][0] == "parameter" for x in operands[1:]):
            continue  # not a select, or the copy branch's (parameters or the EMA, both read)
        if defs[_through_converts(defs, operands[0])][0] == "is-finite":
            yield name, operands, defs, block


@pytest.mark.parametrize(("ema", "dtype"), GUARDED, ids=GUARDED_IDS)
def test_the_guard_never_selects_the_old_ema_buffer_itself(ema, dtype):
    """``where(finite, new, ema)`` into the donated buffer is a masked store on XLA:CPU.

    LLVM turns a store of ``select(m, new, load(p))`` back into ``p`` into
    ``vmaskmovps``, several times slower than a plain store on x86 (benchmarks/README.md).
    The guard selects ``ema + 0`` instead (the zero behind an optimization barrier, so
    that XLA does not fold it): equal for finite entries, one vector add, and no load of
    the destination that LLVM can prove.
    """
    selects = 0
    for name, operands, defs, block in _guard_selects(ema, dtype):
        selects += 1
        fallback = _through_converts(defs, operands[2])
        assert defs[fallback][0] != "parameter", (name, block)
        # ... and it is one add of the old EMA and a zero: not ema + (ema - ema) (0.3.0).
        op, args = defs[fallback]
        assert op == "add", (name, block)
        kinds = sorted(defs[_through_converts(defs, a)][0] for a in args)
        assert kinds == ["broadcast", "parameter"], (name, block)
        (bcast,) = (a for a in args if defs[_through_converts(defs, a)][0] == "broadcast")
        zero = _through_converts(defs, defs[_through_converts(defs, bcast)][1][0])
        assert defs[zero] == ("constant", ["0"]), (name, block)
    assert selects >= 2  # the guard's select is there, in each leaf's fusion


# ------------------------------------------- what a skipped entry keeps, bit for bit

_BIG = float(np.finfo(np.float32).max)
_VALUES = np.array([0.0, -0.0, 1.5, -2.0, _BIG, -_BIG, np.inf, -np.inf, np.nan, 1e-45], "f4")


@pytest.mark.parametrize(("ema", "dtype"), GUARDED, ids=GUARDED_IDS)
def test_a_skipped_entry_keeps_its_previous_value_bit_for_bit(ema, dtype):
    """Every pair (param, EMA entry) of NaN, +-Inf, +-max, +-0 and finite values.

    Where the unguarded update (``nonfinite="propagate"``, the same blend) is finite,
    the guarded one equals it bit for bit; elsewhere the entry keeps its previous value
    (NaN stays NaN, +-Inf stays +-Inf: version 0.3.0 turned an infinite EMA entry into
    NaN, ``inf + (inf - inf)``); a -0.0 comes back as +0.0 (the guard writes
    ``ema + 0``). Overflows: ``max - (-max)`` in float32, and ``max`` rounding to Inf in
    bfloat16.
    A subnormal previous value comes back as zero: XLA:CPU flushes subnormals (the
    unguarded update too).
    """
    p, e = (x.ravel() for x in np.meshgrid(_VALUES, _VALUES))
    params = {"w": jnp.asarray(p, dtype)}
    previous = np.asarray(jnp.asarray(e, dtype))
    unguarded = dataclasses.replace(ema, nonfinite="propagate")
    results = []
    for transform in (ema, unguarded):
        state = transform.init(params | {"w": jnp.zeros_like(params["w"])})
        lead = state.ema["w"].shape[1:]
        start = np.broadcast_to(previous.reshape(-1, *(1,) * len(lead)), state.ema["w"].shape)
        state = state._replace(ema={"w": jnp.asarray(start)})
        for _ in range(2):  # step 0 may copy (warmups); step 1 blends
            state = jax.jit(transform.update)(params, state)
        results.append(np.asarray(state.ema["w"], np.float32))
    guarded, reference = results
    prev = np.broadcast_to(
        np.asarray(jnp.asarray(e, dtype), np.float32).reshape(-1, *(1,) * (guarded.ndim - 1)),
        guarded.shape,
    )
    finite = np.isfinite(reference)
    assert np.array_equal(guarded[finite].view("u4"), reference[finite].view("u4"))
    kept = guarded[~finite]
    want = prev[~finite]
    if jax.default_backend() == "cpu":  # XLA:CPU flushes subnormals to zero, everywhere
        want = np.where(np.abs(want) < np.finfo(np.float32).tiny, np.float32(0), want)
    want = want + np.float32(0)  # -0.0 -> +0.0; NaN, +-Inf as they were
    assert np.array_equal(np.isnan(kept), np.isnan(want))
    assert np.array_equal(kept[~np.isnan(kept)].view("u4"), want[~np.isnan(want)].view("u4"))
    assert np.isinf(kept).sum() == np.isinf(want).sum() > 0  # infinite entries were kept

"""What the guard costs in the compiled loop: x86 instructions per 8 fp32 entries.

Run from the repository root (a few seconds; needs ``objdump``):

    PYTHONPATH=. python benchmarks/guard_asm.py [--out benchmarks/results/guard-asm-<machine>.json]

Compiles each formulation of ``benchmarks/bench_guard.py`` for one donated 4M-entry
fp32 leaf with ``XLA_FLAGS=--xla_dump_to=<tmp>``, disassembles the object files XLA:CPU
writes, finds the hot loop (the block that ends in a backward jump and stores vectors)
and counts its instructions per 8-entry vector, loop control (add, cmp, jne) left out.
Also reports how many parallel partitions XLA:CPU gave the fusion
(``outer_dimension_partitions``): the loop runs on that many threads.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

DUMP = tempfile.mkdtemp(prefix="guard-asm-")
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_dump_to={DUMP}".strip()

import jax  # noqa: E402  (after XLA_FLAGS)
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from _timing import machine_name  # noqa: E402
from _timing import write_results  # noqa: E402

import ema_jax  # noqa: E402
from ema_jax import schedules  # noqa: E402

PYCLS = dict(ema_alpha=1e-5, batch_size=128, max_epoch=200, update_period=1)
N = 1 << 22
_LINE = re.compile(r"^\s*([0-9a-f]+):\s+(\S+)\s*(.*)$")
_CONTROL = {"add", "cmp", "jne", "jb", "jl", "inc", "sub", "nop", "nopl", "nopw", "xchg"}


def formulations(alpha: float) -> dict[str, tuple[str, Any]]:
    """name -> (label, a function of (params, ema) returning the new EMA leaf)."""

    def via(ema: ema_jax.Ema) -> Any:
        def update(p: jax.Array, e: jax.Array) -> jax.Array:
            state = ema.init(p)._replace(ema=e)
            return ema.update(p, state).ema

        return update

    def guard_030(p: jax.Array, e: jax.Array) -> jax.Array:
        new = e + alpha * (p - e)
        return jnp.where(jnp.isfinite(new), new, e + (e - e))

    def previous(p: jax.Array, e: jax.Array) -> jax.Array:
        new = e + alpha * (p - e)
        return jnp.where(jnp.isfinite(new), new, e)

    def four_ops(p: jax.Array, e: jax.Array) -> jax.Array:
        new = e + alpha * (p - e)
        return new + ((e - e) - (p - p))

    return {
        "propagate": (
            "ema(pycls), nonfinite='propagate'",
            via(ema_jax.ema(schedules.pycls(**PYCLS), nonfinite="propagate")),
        ),
        "default": (
            "ema(pycls), default nonfinite='skip'",
            via(ema_jax.ema(schedules.pycls(**PYCLS))),
        ),
        "guard_030": ("0.3.0 guard: where(isfinite(new), new, e+(e-e))", guard_030),
        "previous_guard": ("previous guard: where(isfinite(new), new, e)", previous),
        "four_ops": ("control: unguarded + 4 vector ops, no select", four_ops),
        "optax": (
            "optax.incremental_update",
            lambda p, e: optax.incremental_update(p, e, step_size=alpha),
        ),
    }


def hot_loop(obj: Path) -> list[tuple[str, str]] | None:
    """(mnemonic, operands) of the object file's vector loop, or None when it has none."""
    text = subprocess.run(
        ["objdump", "-d", "--no-show-raw-insn", str(obj)], capture_output=True, text=True
    ).stdout
    lines = [(int(m[1], 16), m[2], m[3]) for m in map(_LINE.match, text.splitlines()) if m]
    best: list[tuple[str, str]] | None = None
    for k, (_, op, args) in enumerate(lines):
        target = re.match(r"([0-9a-f]+) <", args)
        if not op.startswith("j") or target is None or int(target[1], 16) >= lines[k][0]:
            continue
        body = [(o, x) for a, o, x in lines[: k + 1] if a >= int(target[1], 16)]
        if vector_stores(body) and (best is None or len(body) > len(best)):
            best = body
    return best


def vector_stores(body: list[tuple[str, str]]) -> int:
    """Stores of a ymm register to memory (AT&T: the destination is the last operand)."""
    return sum(
        1
        for op, args in body
        if op in ("vmovups", "vmovaps", "vmaskmovps") and "%ymm" in args and args.endswith(")")
    )


def per_vector(body: list[tuple[str, str]]) -> dict[str, float]:
    """Instructions per stored vector (8 fp32 entries), loop control left out."""
    stores = vector_stores(body)
    counts = collections.Counter(op for op, _ in body if op not in _CONTROL)
    return {op: n / stores for op, n in sorted(counts.items())}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    alpha = schedules.pycls(**PYCLS).alpha
    params = jnp.linspace(-1.0, 1.0, N, dtype=jnp.float32)
    rows: dict[str, Any] = {}
    for key, (label, fn) in formulations(alpha).items():
        before = set(Path(DUMP).iterdir())
        named = jax.jit(fn, donate_argnums=1)
        hlo = named.lower(params, params.copy()).compile().as_text()
        new = sorted(set(Path(DUMP).iterdir()) - before)
        loops = [b for b in (hot_loop(f) for f in new if f.suffix == ".o") if b]
        if not loops:
            sys.exit(f"{key}: no vector loop found in {[f.name for f in new]}")
        counts = per_vector(max(loops, key=len))
        partitions = re.findall(r'outer_dimension_partitions":\[([^]]*)\]', hlo)
        rows[key] = {
            "label": label,
            "per_vector": counts,
            "instructions_per_vector": sum(counts.values()),
            "partitions": sorted(set(partitions)),
        }
    print(f"x86 instructions per 8 fp32 entries in the hot loop ({N:,} entries, donated)")
    for row in rows.values():
        ops = ", ".join(f"{op} {n:g}" for op, n in row["per_vector"].items())
        print(f"  {row['label']:<50} {row['instructions_per_vector']:>4g}: {ops}")
        print(f"  {'':<50} partitions: {row['partitions']}")
    result = {"machine": machine_name(), "jax": jax.__version__, "entries": N, "rows": rows}
    write_results(result, "guard-asm", args.out)


if __name__ == "__main__":
    main()

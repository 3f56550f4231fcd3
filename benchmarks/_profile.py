"""The EMA's own time inside a compiled train step, from XLA:CPU's per-thunk trace.

A wall-clock difference between two train steps of ~30 ms cannot resolve 0.3 ms on
a shared machine (its quartiles span several percent), and the two compiled
programs differ in more than the EMA. XLA:CPU records every thunk it runs when
``--xla_cpu_enable_xprof_traceme`` is set (bench_ema.py sets it before JAX starts):
the EMA is the step's ``conditional`` thunk and the kernels of its branches, so
their recorded durations per step are the EMA's direct cost, to the microsecond.
"""

from __future__ import annotations

import gzip
import json
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

TRACEME_FLAG = "--xla_cpu_enable_xprof_traceme=true"


def conditional_thunks(compiled: Any) -> tuple[list[str], list[str]]:
    """The entry computation's conditionals, and the instructions of their branches.

    Both are thunk names in XLA:CPU's trace: the conditional's own event, and one
    event per kernel its taken branch runs (the branch may hand kernels to worker
    threads, so the conditional's event alone can end before they do).
    """
    comps: dict[str, list[tuple[str, str, str]]] = {}
    entry, current = "", None
    for line in compiled.as_text().splitlines():
        header = re.match(r"^(?:ENTRY )?%(\S+) .*\{$", line)
        if header:
            current = comps.setdefault(header.group(1), [])
            entry = header.group(1) if line.startswith("ENTRY") else entry
            continue
        m = re.match(r"^\s+(?:ROOT )?%(\S+) = .*? ([a-z][a-z0-9-]*)\((.*)$", line)
        if m and current is not None:
            current.append(m.groups())
    conds, kernels = [], []
    for name, op, rest in comps[entry]:
        if op != "conditional":
            continue
        conds.append(name)
        branches = re.search(r"branch_computations=\{([^}]*)\}", rest)
        for branch in branches.group(1).split(", ") if branches else []:
            kernels += [n for n, o, _ in comps[branch.lstrip("%")] if o not in _FREE]
    return conds, kernels


# Instructions that are no thunk of their own (or cost nothing).
_FREE = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant"}


def thunk_times_per_call(
    run: Callable[[Any], Any], state: Any, groups: dict[str, list[str]], calls: int
) -> tuple[dict[str, float], Any]:
    """Runs ``state = run(state)`` ``calls`` times under the profiler.

    Returns, for each group of thunk names, per call (ms): ``<group>_busy``, the sum
    of their recorded durations (thread time; a kernel split over two threads
    counts twice), and ``<group>_wall``, the wall time they cover (overlaps once);
    and the last state.
    """
    with tempfile.TemporaryDirectory() as tmp:
        jax.profiler.start_trace(tmp, create_perfetto_trace=True)
        for _ in range(calls):
            state = run(state)
        jax.block_until_ready(state)
        jax.profiler.stop_trace()
        (trace,) = Path(tmp).rglob("perfetto_trace.json.gz")
        events = json.loads(gzip.decompress(trace.read_bytes()))
    if isinstance(events, dict):
        events = events["traceEvents"]
    spans: dict[str, list[tuple[float, float]]] = {}
    for e in events:
        if e.get("ph") == "X":
            spans.setdefault(e["name"], []).append((e["ts"], e["ts"] + e.get("dur", 0)))
    out = {}
    for group, names in groups.items():
        intervals = sorted(iv for n in names for iv in spans.get(n, []))
        busy = sum(b - a for a, b in intervals)
        covered, end = 0.0, float("-inf")  # wall time covered: overlaps counted once
        for a, b in intervals:
            if b > end:
                covered += b - max(a, end)
                end = b
        out[f"{group}_busy"] = busy / calls / 1e3
        out[f"{group}_wall"] = covered / calls / 1e3
    return out, state

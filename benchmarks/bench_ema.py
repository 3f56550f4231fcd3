"""The EMA update against the memory-bandwidth floor, skipped steps, a train step, peers.

Run from the repository root (one process, about 4 minutes on 2 CPU cores):

    PYTHONPATH=. python benchmarks/bench_ema.py [--quick] [--sizes 1e6,25e6,100e6]
        [--rounds 9] [--out benchmarks/results/<machine>.json]

Prints one table per item of the benchmark issue and writes every raw sample, the
ratios and which targets were met to JSON. PyTorch peers run when torch imports.
"""

from __future__ import annotations

import os

# PyTorch's OpenMP threads spin-wait by default; sharing 2 cores with XLA's thread pool
# (and other processes) that made the same torch._foreach_lerp_ take 80-220 ms instead
# of 8-9 ms here. Passive waiting is the fair setting for the peers; set before torch
# is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# XLA:CPU records each thunk it runs (for benchmarks/_profile.py); set before JAX starts.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true"
).strip()

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
from _profile import conditional_thunks
from _profile import thunk_times_per_call
from _timing import Candidate
from _timing import machine_name
from _timing import measure
from _timing import paired_diff
from _timing import paired_diff_quartiles
from _timing import paired_ratio
from _timing import paired_ratio_quartiles
from _timing import summary
from _workloads import SmallResNet
from _workloads import copy_tree
from _workloads import make_train_states
from _workloads import numpy_inplace_blend
from _workloads import optax_incremental
from _workloads import param_tree
from _workloads import torch_peers
from _workloads import train_step
from _workloads import tree_bytes
from _workloads import where_every_step

import ema_jax

# pycls's defaults (EMA_ALPHA 1e-5, batch 128, 200 epochs); the period varies.
HYPER = dict(ema_alpha=1e-5, batch_size=128, max_epoch=200)
# Temporaries the EMA may add, per EMA leaf: XLA:CPU's tuple pointer tables (8 bytes
# per leaf per tuple) and, with the guard, each leaf's count scalar at 64-byte
# alignment. They scale with the number of leaves, never with their sizes.
TEMP_BYTES_PER_LEAF = 512


def ema_update(period: int, guard: bool, **kw: Any) -> tuple[Any, Any]:
    ema = ema_jax.normalized_ema(**HYPER, update_period=period, skip_nonfinite=guard, **kw)
    return ema, jax.jit(ema.update, donate_argnums=1)


def section_update(rounds: int) -> tuple[dict, dict[str, Candidate]]:
    """Item 1: the donated update vs the streaming floor on the same bytes."""
    params = param_tree()
    n = sum(x.size for x in jax.tree.leaves(params))
    nbytes = 3 * 4 * n  # read the EMA and the parameters, write the EMA
    ema, _ = ema_update(1, False)
    a = ema.alpha
    flat_p = jnp.concatenate([x.reshape(-1) for x in jax.tree.leaves(params)])
    blend = jax.jit(lambda e, p: e + a * (p - e), donate_argnums=0)
    tree_blend = jax.jit(
        lambda e, p: jax.tree.map(lambda x, y: x + a * (y - x), e, p), donate_argnums=0
    )
    cands = {
        "floor_xla_flat": Candidate(
            "floor: XLA a+s*(b-a), one flat buffer, donated",
            lambda e: blend(e, flat_p),
            flat_p.copy(),
            5,
            nbytes,
        ),
        "floor_numpy": Candidate(
            "floor: NumPy in place (chunked, 1 thread)",
            numpy_inplace_blend(a),
            (np.array(flat_p), np.array(flat_p)),
            5,
            nbytes,
        ),
        "tree_map": Candidate(
            "tree_map blend, 161 leaves, donated",
            lambda e: tree_blend(e, params),
            copy_tree(params),
            5,
            nbytes,
        ),
    }
    for guard in (False, True):
        ema, upd = ema_update(1, guard)
        key = f"update_guard_{'on' if guard else 'off'}"
        label = f"normalized_ema update, skip_nonfinite={guard}"
        cands[key] = Candidate(label, lambda s, u=upd: u(params, s), ema.init(params), 5, nbytes)
    bf16 = param_tree(dtype=jnp.bfloat16)
    ema, upd = ema_update(1, False, ema_dtype=jnp.float32)
    cands["update_bf16_fp32ema"] = Candidate(
        "update, bf16 params -> fp32 EMA, guard off",
        lambda s: upd(bf16, s),
        ema.init(bf16),
        5,
        (2 + 4 + 4) * n,
    )
    measure(list(cands.values()), rounds)
    floor = cands["floor_xla_flat"]
    out = {k: summary(c) | {"label": c.name} for k, c in cands.items()}
    for k, c in cands.items():
        out[k]["ratio_to_xla_floor"] = paired_ratio(c, floor)
        out[k]["ratio_to_numpy_floor"] = paired_ratio(c, cands["floor_numpy"])
    out["params"] = n
    out["leaves"] = len(jax.tree.leaves(params))
    return out, cands


def section_bandwidth(rounds: int) -> dict:
    """Is the floor DRAM or cache? The flat donated blend at working sets around L3."""
    cands = []
    for n in (1 << 18, 1 << 20, 1 << 22, 25_000_000):
        a = jnp.ones(n) * 0.5
        blend = jax.jit(lambda e, p: e + 0.01 * (p - e), donate_argnums=0)
        calls = max(5, 50_000_000 // n)
        cands.append(Candidate(str(n), lambda e, f=blend, p=a: f(e, p), a.copy(), calls, 12 * n))
    measure(cands, rounds)
    return {c.name: summary(c) | {"working_set_bytes": c.nbytes} for c in cands}


def section_skip(rounds: int) -> dict:
    """Item 2: a skipped call vs an updating one vs the dispatch floor; amortized costs."""
    params = param_tree()
    cands: dict[str, Candidate] = {}
    ema, _ = ema_update(1, True)
    noop = jax.jit(lambda p, s: s._replace(step=s.step + 1), donate_argnums=1)
    cands["dispatch_floor"] = Candidate(
        "empty jitted call, same buffers in and out (donated)",
        lambda s: noop(params, s),
        ema.init(params),
        200,
    )
    for guard in (False, True):
        g = "on" if guard else "off"
        # A period so long that no call after step 0 updates; ema_alpha scaled so that
        # alpha is period 32's (not clamped to 1): the same compiled program as k=32.
        never = ema_jax.normalized_ema(
            **(HYPER | {"ema_alpha": HYPER["ema_alpha"] / 2**25}),
            update_period=2**30,
            skip_nonfinite=guard,
        )
        upd_never = jax.jit(never.update, donate_argnums=1)
        cands[f"skip_guard_{g}"] = Candidate(
            f"update, non-updating call, skip_nonfinite={guard}",
            lambda s, u=upd_never: u(params, s),
            never.init(params)._replace(step=jnp.ones((), jnp.int32)),
            200,
        )
        ema, upd = ema_update(1, guard)
        cands[f"update_guard_{g}"] = Candidate(
            f"update, updating call, skip_nonfinite={guard}",
            lambda s, u=upd: u(params, s),
            ema.init(params),
            5,
        )
    for period in (1, 8, 32):
        ema, upd = ema_update(period, True)
        cands[f"amortized_p{period}"] = Candidate(
            f"per step at update_period={period} (32 steps per sample)",
            lambda s, u=upd: u(params, s),
            ema.init(params),
            32,
        )
    measure(list(cands.values()), rounds)
    out: dict[str, Any] = {k: summary(c) | {"label": c.name} for k, c in cands.items()}
    for g in ("off", "on"):
        extra = paired_diff(cands[f"skip_guard_{g}"], cands["dispatch_floor"])
        out[f"skip_minus_dispatch_ms_guard_{g}"] = extra
        upd = statistics.median(cands[f"update_guard_{g}"].samples)
        out[f"skip_extra_fraction_of_update_guard_{g}"] = extra / upd
    return out


def section_train(rounds: int) -> tuple[dict, dict]:
    """Items 3 and 4: the EMA inside a jitted, donated train step; its compiled memory."""
    batch = 16
    model = SmallResNet()
    x = jax.random.normal(jax.random.key(1), (batch, 16, 16, 3))
    y = jax.random.randint(jax.random.key(2), (batch,), 0, 10)
    emas = {
        f"ema_p{k}_guard_{'on' if g else 'off'}": ema_jax.normalized_ema(
            ema_alpha=2.5e-4, batch_size=batch, max_epoch=100, update_period=k, skip_nonfinite=g
        )
        for k in (32, 1)
        for g in (True, False)
    }
    for g in (True, False):
        # Never updates after step 0, with period 32's alpha: the same program as the
        # others but for constants, so ema_p1 - ema_never is the update inside the step.
        emas[f"ema_never_guard_{'on' if g else 'off'}"] = ema_jax.normalized_ema(
            ema_alpha=2.5e-4 / 2**25,
            batch_size=batch,
            max_epoch=100,
            update_period=2**30,
            skip_nonfinite=g,
        )
    states = make_train_states(model, x, emas)
    cands: dict[str, Candidate] = {}
    steps: dict[str, Any] = {}
    memory: dict[str, Any] = {}
    for name, state in states.items():
        step = jax.jit(train_step, donate_argnums=0)
        m = step.lower(state, x, y).compile().memory_analysis()
        memory[name] = {
            f: getattr(m, f"{f}_size_in_bytes")
            for f in ("argument", "output", "alias", "temp", "generated_code")
        }
        if name != "plain":
            memory[name]["ema_state_bytes"] = tree_bytes(state.ema_state)
            memory[name]["ema_leaves"] = len(jax.tree.leaves(state.ema_state.ema))
        cands[name] = Candidate(name, lambda s, f=step: f(s, x, y), state, 32)
        steps[name] = step
    plain = states["plain"]  # its buffers are donated below: the standalone update gets copies
    variables = copy_tree({"params": plain.params, "batch_stats": plain.batch_stats})
    # The same EMA standalone on the model's variables: its parts, measured precisely.
    noop = jax.jit(lambda p, s: s._replace(step=s.step + 1), donate_argnums=1)
    zero = emas["ema_p1_guard_on"].init(variables)
    cands["standalone_dispatch"] = Candidate("empty call", lambda s: noop(variables, s), zero, 64)
    for guard in (False, True):
        g = "on" if guard else "off"
        ema = emas[f"ema_p1_guard_{g}"]
        upd = jax.jit(ema.update, donate_argnums=1)
        cands[f"standalone_update_guard_{g}"] = Candidate(
            f"standalone update, skip_nonfinite={guard}",
            lambda s, u=upd: u(variables, s),
            ema.init(variables),
            64,
        )
        never = emas[f"ema_never_guard_{g}"]
        upd = jax.jit(never.update, donate_argnums=1)
        cands[f"standalone_skip_guard_{g}"] = Candidate(
            f"standalone non-updating call, skip_nonfinite={guard}",
            lambda s, u=upd: u(variables, s),
            never.init(variables)._replace(step=jnp.ones((), jnp.int32)),
            64,
        )
    measure(list(cands.values()), rounds)
    out: dict[str, Any] = {k: summary(c) for k, c in cands.items()}
    for name in emas:  # the EMA's thunks in the step, traced over 64 steps
        c = cands[name]
        conds, kernels = conditional_thunks(steps[name].lower(c.state, x, y).compile())
        groups = {"ema": conds + kernels, "kernels": kernels}
        times, c.state = thunk_times_per_call(c.step, c.state, groups, 64)
        # The wall time covered by the conditional and its kernels, once each.
        out[name]["in_step_ms"] = times["ema_wall"]
        out[name]["in_step_kernels_busy_ms"] = times["kernels_busy"]
        out[name]["in_step_fraction"] = out[name]["in_step_ms"] / out["plain"]["median_ms"]
    out["params"] = sum(x.size for x in jax.tree.leaves(variables["params"]))
    out["batch"] = batch
    plain = cands["plain"]
    for name, ema in emas.items():
        out[name]["overhead_fraction"] = paired_ratio(cands[name], plain) - 1
        out[name]["overhead_ms"] = paired_diff(cands[name], plain)
        out[name]["overhead_ms_q1_q3"] = paired_diff_quartiles(cands[name], plain)
        q1, q3 = paired_ratio_quartiles(cands[name], plain)
        out[name]["overhead_fraction_q1_q3"] = (q1 - 1, q3 - 1)
        out[name]["overhead_fraction_of_minima"] = min(cands[name].samples) / min(plain.samples) - 1
        # The amortized cost from its parts: one update every `period` steps, the
        # other steps a skipped call; inside the step, no dispatch of its own.
        g = "on" if ema.skip_nonfinite else "off"
        update = paired_diff(cands[f"standalone_update_guard_{g}"], cands["standalone_dispatch"])
        skip = paired_diff(cands[f"standalone_skip_guard_{g}"], cands["standalone_dispatch"])
        k = ema.update_period
        amortized = (update + (k - 1) * skip) / k
        out[name]["amortized_from_parts_ms"] = amortized
        out[name]["expected_fraction"] = amortized / out["plain"]["median_ms"]
        # In the step: the traced thunks, plus the per-call cost of the EMA's buffers
        # in the compiled program, which is no thunk (a skipped call's cost standalone).
        out[name]["call_overhead_ms"] = skip
        cost = out[name]["in_step_ms"] + skip
        out[name]["in_step_cost_ms"] = cost
        out[name]["in_step_cost_fraction"] = cost / out["plain"]["median_ms"]
        if k == 1:  # an update inside the step vs a skipped call inside the step
            out[name]["update_in_step_ms"] = paired_diff(cands[name], cands[f"ema_never_guard_{g}"])
            out[name]["update_standalone_ms"] = update - skip
    for name, m in memory.items():
        if name != "plain":
            for f in ("argument", "output", "alias", "temp"):
                m[f"{f}_minus_plain"] = m[f] - memory["plain"][f]
    return out, memory


def section_update_memory() -> dict:
    """Item 4, standalone: the donated update's compiled memory, fp32 and bf16 -> fp32."""
    out = {}
    cases = (("fp32", jnp.float32, None), ("bf16_fp32ema", jnp.bfloat16, jnp.float32))
    for label, dtype, ema_dtype in cases:
        params = param_tree(dtype=dtype)
        for guard in (False, True):
            ema, upd = ema_update(32, guard, ema_dtype=ema_dtype)
            state = ema.init(params)
            m = upd.lower(params, state).compile().memory_analysis()
            out[f"{label}_guard_{'on' if guard else 'off'}"] = {
                "ema_state_bytes": tree_bytes(state),
                "param_bytes": tree_bytes(params),
                "alias": m.alias_size_in_bytes,
                "temp": m.temp_size_in_bytes,
                "argument": m.argument_size_in_bytes,
                "output": m.output_size_in_bytes,
                "ema_leaves": len(jax.tree.leaves(state.ema)),
            }
    return out


def section_peers(sizes: list[int], rounds: int) -> dict:
    """Item 5: peers on the same tree at several sizes, per update and per step at k=32."""
    out: dict[str, Any] = {}
    torch = torch_peers(ema_jax.normalized_ema(**HYPER, update_period=1).alpha)
    for total in sizes:
        params = param_tree(total=total)
        n = sum(x.size for x in jax.tree.leaves(params))
        nbytes = 12 * n
        calls = 50 if n <= 2_000_000 else 5 if n <= 30_000_000 else 2
        ema, _ = ema_update(1, False)
        a = ema.alpha
        flat_p = jnp.concatenate([x.reshape(-1) for x in jax.tree.leaves(params)])
        blend = jax.jit(lambda e, p, a=a: e + a * (p - e), donate_argnums=0)
        noop = jax.jit(lambda p, s: (s[0], s[1] + 1), donate_argnums=1)
        cands: dict[str, Candidate] = {
            "floor_xla_flat": Candidate(
                "floor", lambda e, b=blend, f=flat_p: b(e, f), flat_p.copy(), calls, nbytes
            ),
            "dispatch_floor": Candidate(
                "dispatch",
                lambda s, f=noop, p=params: f(p, s),
                (copy_tree(params), jnp.zeros((), jnp.int32)),
                32,
            ),
        }
        for guard in (False, True):
            for period in (1, 32):
                ema, upd = ema_update(period, guard)
                cands[f"ours_p{period}_guard_{'on' if guard else 'off'}"] = Candidate(
                    "ours",
                    lambda s, u=upd, p=params: u(p, s),
                    ema.init(params),
                    calls if period == 1 else 32,
                    nbytes if period == 1 else 0,
                )
        inc = optax_incremental(a)
        cands["optax_incremental_update"] = Candidate(
            "optax", lambda e, f=inc, p=params: f(p, e), copy_tree(params), calls, nbytes
        )
        where = where_every_step(a, 32)
        cands["where_every_step_p32"] = Candidate(
            "where",
            lambda s, f=where, p=params: f(p, s),
            (copy_tree(params), jnp.zeros((), jnp.int32)),
            calls,
        )
        if torch is not None:
            for key in ("foreach_lerp", "pycls_loop"):
                tp = torch["to_torch"](params)
                cands[f"torch_{key}"] = Candidate(
                    key, torch[key], (torch["to_torch"](params), tp, 0), calls, nbytes
                )
        measure(list(cands.values()), rounds if n <= 30_000_000 else max(3, rounds // 2))
        res: dict[str, Any] = {k: summary(c) for k, c in cands.items()}
        for k, c in cands.items():
            res[k]["ratio_to_xla_floor"] = paired_ratio(c, cands["floor_xla_flat"])
        for k in ("ours_p32_guard_off", "ours_p32_guard_on", "where_every_step_p32"):
            # Inside a jitted train step the call's dispatch is the step's, not the EMA's.
            res[k]["per_step_p32_net_ms"] = paired_diff(cands[k], cands["dispatch_floor"])
        for k in ("torch_foreach_lerp", "torch_pycls_loop"):
            if k in res:  # a Python `if step % 32` skips the other 31 calls for free
                res[k]["per_step_p32_net_ms"] = res[k]["median_ms"] / 32
        res["params"] = n
        out[str(n)] = res
        del cands
    if torch is not None:
        out["torch"] = {"version": torch["version"], "threads": torch["threads"]}
    return out


def evaluate(r: dict) -> dict[str, dict[str, Any]]:
    """Each target of the issue: the numbers it is judged on and whether it was met."""
    u, s, t = r["update_vs_floor"], r["skipped_steps"], r["train_step"]
    mem, umem = r["train_memory"], r["update_memory"]
    targets: dict[str, dict[str, Any]] = {}
    ratio = u["update_guard_off"]["ratio_to_xla_floor"]
    targets["update_within_10pct_of_floor"] = {
        "value": ratio,
        "guard_on_value": u["update_guard_on"]["ratio_to_xla_floor"],
        "met": ratio <= 1.10,
        "note": "skip_nonfinite=False vs the donated flat XLA blend (the faster floor)",
    }
    for g in ("off", "on"):
        frac = s[f"skip_extra_fraction_of_update_guard_{g}"]
        targets[f"skip_under_5pct_of_update_beyond_dispatch_guard_{g}"] = {
            "value": frac,
            "met": frac < 0.05,
        }
    for g in ("on", "off"):
        c = t[f"ema_p32_guard_{g}"]
        value = max(c["in_step_cost_fraction"], c["expected_fraction"])
        targets[f"p32_train_overhead_under_1pct_guard_{g}"] = {
            "value": value,
            "in_step_traced_plus_call_overhead": c["in_step_cost_fraction"],
            "from_standalone_parts": c["expected_fraction"],
            "wall_clock_diff": c["overhead_fraction"],
            "wall_clock_diff_q1_q3": c["overhead_fraction_q1_q3"],
            "met": value < 0.01,
            "note": "the larger of (traced EMA thunks in the step + per-call overhead) and"
            " (update + 31 skipped calls) / 32 standalone, over the plain step's median;"
            " the wall-clock difference of ~30 ms steps is noise on this machine",
        }
    for g in ("on", "off"):
        c = t[f"ema_p1_guard_{g}"]
        alone = t[f"standalone_update_guard_{g}"]["median_ms"]
        targets[f"p1_train_overhead_le_standalone_guard_{g}"] = {
            "value_ms": c["in_step_cost_ms"],
            "standalone_ms": alone,
            "met": c["in_step_cost_ms"] <= alone,
            "wall_clock_diff_ms": c["overhead_ms"],
            "wall_clock_diff_q1_q3_ms": c["overhead_ms_q1_q3"],
            "note": "traced EMA thunks in the step + per-call overhead vs a standalone"
            " jitted update of the same variables (wall clock, its dispatch included)",
        }
    ok = all(
        m["alias_minus_plain"] == m["ema_state_bytes"]
        and m["temp_minus_plain"] <= TEMP_BYTES_PER_LEAF * m["ema_leaves"]
        for name, m in mem.items()
        if name != "plain"
    )
    ok = ok and all(
        m["alias"] == m["ema_state_bytes"] and m["temp"] <= TEMP_BYTES_PER_LEAF * m["ema_leaves"]
        for m in umem.values()
    )
    worst = max(
        [m["temp_minus_plain"] / m["ema_leaves"] for n, m in mem.items() if n != "plain"]
        + [m["temp"] / m["ema_leaves"] for m in umem.values()]
    )
    targets["no_param_sized_temporaries_and_full_aliasing"] = {
        "met": ok,
        "worst_temp_bytes_per_ema_leaf": worst,
        "allowed_temp_bytes_per_ema_leaf": TEMP_BYTES_PER_LEAF,
    }
    # Each peer as it is used: timm's ModelEmaV3 and optax update every step (no
    # period), pycls skips with a Python `if`, a naive period runs jnp.where each step.
    behind, hypothetical = [], []
    for size, res in r["peers"].items():
        if "params" not in res:
            continue
        ours1 = res["ours_p1_guard_off"]["median_ms"]
        ours32 = res["ours_p32_guard_off"]["per_step_p32_net_ms"]
        for k in ("optax_incremental_update", "torch_foreach_lerp", "torch_pycls_loop"):
            if k in res and res[k]["median_ms"] <= ours1:
                behind.append(f"{k} per update @{size}: {res[k]['median_ms']:.3f} <= {ours1:.3f}")
        for k in ("where_every_step_p32", "torch_pycls_loop", "torch_foreach_lerp"):
            if k in res and res[k]["per_step_p32_net_ms"] <= ours32:
                v = res[k]["per_step_p32_net_ms"]
                line = f"{k} per step at k=32 @{size}: {v:.3f} <= {ours32:.3f}"
                # timm has no period: a period around it is a user's Python `if`.
                (hypothetical if k == "torch_foreach_lerp" else behind).append(line)
    targets["ahead_of_every_peer"] = {
        "met": not behind,
        "behind": behind,
        "not_judged_torch_foreach_lerp_with_a_python_if": hypothetical,
    }
    return targets


def fmt_row(name: str, c: dict, extra: str = "") -> str:
    gbs = f"{c['gb_per_s']:7.1f}" if "gb_per_s" in c else "      -"
    return f"  {name:<48s} {c['median_ms']:9.3f} {c['min_ms']:9.3f} {gbs}  {extra}"


def print_report(r: dict) -> None:
    head = f"  {'':<48s} {'median ms':>9s} {'min ms':>9s} {'GB/s':>7s}"
    u = r["update_vs_floor"]
    print(f"\n[1] update vs streaming floor: {u['params']:,} fp32 params in {u['leaves']} leaves")
    print(head + "  ratio to XLA floor (paired)")
    for c in u.values():
        if isinstance(c, dict):
            print(fmt_row(c["label"], c, f"{c['ratio_to_xla_floor']:.3f}"))
    print("\n    the floor by working set (flat donated blend; L2 1 MiB/core, L3 32 MiB)")
    for k, c in r["bandwidth_probe"].items():
        print(fmt_row(f"{int(k):,} fp32 ({c['working_set_bytes'] / 2**20:.0f} MiB moved)", c))
    s = r["skipped_steps"]
    print("\n[2] skipped steps (ResNet-50 tree)")
    print(head)
    for c in s.values():
        if isinstance(c, dict):
            print(fmt_row(c["label"], c))
    for g in ("off", "on"):
        print(
            f"  skip_nonfinite {g}: skip - dispatch floor ="
            f" {s[f'skip_minus_dispatch_ms_guard_{g}'] * 1e3:.1f} us ="
            f" {100 * s[f'skip_extra_fraction_of_update_guard_{g}']:.2f}% of an update"
        )
    t = r["train_step"]
    print(
        f"\n[3] train step: SmallResNet, {t['params']:,} params, batch {t['batch']}, SGD+momentum"
    )
    print(
        head + "  EMA per step: traced thunks + call overhead; wall-clock diff [IQR];"
        " from standalone parts"
    )
    for k, c in t.items():
        if not isinstance(c, dict):
            continue
        extra = ""
        if "overhead_fraction" in c:
            q1, q3 = c["overhead_fraction_q1_q3"]
            extra = (
                f"{c['in_step_ms'] * 1e3:4.0f}+{c['call_overhead_ms'] * 1e3:3.0f} us ="
                f" {100 * c['in_step_cost_fraction']:.2f}%;"
                f" {100 * c['overhead_fraction']:+.1f}% [{100 * q1:+.1f}..{100 * q3:+.1f}];"
                f" {100 * c['expected_fraction']:.2f}%"
            )
        print(fmt_row(k, c, extra))
    print("\n[4] compiled memory (bytes): train step (donated), and the standalone update")
    cols = ("argument", "output", "alias", "temp", "EMA state")
    print(f"  {'':<30s}" + "".join(f"{c:>13s}" for c in cols))
    for k, m in r["train_memory"].items():
        print(
            f"  {k:<30s} {m['argument']:12,d} {m['output']:12,d} {m['alias']:12,d}"
            f" {m['temp']:12,d} {m.get('ema_state_bytes', 0):12,d}"
        )
    for k, m in r["update_memory"].items():
        print(
            f"  {'update_' + k:<30s} {m['argument']:12,d} {m['output']:12,d} {m['alias']:12,d}"
            f" {m['temp']:12,d} {m['ema_state_bytes']:12,d}"
        )
    print("\n[5] peers on the same tree (161 leaves): ms per call; ratio to the XLA floor")
    for res in r["peers"].values():
        if not isinstance(res, dict) or "params" not in res:
            continue
        print(f"  {res['params']:,} params")
        for k, c in res.items():
            if isinstance(c, dict):
                extra = f"{c['ratio_to_xla_floor']:6.3f}"
                if k.startswith("torch"):
                    extra += f"  per step at k=32: {c['per_step_p32_net_ms']:.4f} (update/32)"
                elif "per_step_p32_net_ms" in c:
                    extra += f"  per step at k=32 net of dispatch: {c['per_step_p32_net_ms']:.4f}"
                print(fmt_row(k, c, extra))
    print("\ntargets")
    for k, v in r["targets"].items():
        shown = {a: round(b, 4) if isinstance(b, float) else b for a, b in v.items() if a != "met"}
        print(f"  {'MET    ' if v['met'] else 'NOT MET'} {k}: {shown}")
    print(f"\nloadavg start {r['loadavg_start']}, end {r['loadavg_end']}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds, no 100M run")
    parser.add_argument("--sizes", default=None, help="peer sizes, e.g. 1e6,25e6,100e6")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds")
    parser.add_argument("--out", default=None, help="JSON path (default: results/<machine>.json)")
    args = parser.parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 9)
    sizes_arg = args.sizes or ("1e6,25e6" if args.quick else "1e6,25e6,100e6")
    sizes = [int(float(x)) for x in sizes_arg.split(",")]
    name = machine_name()
    out = Path(args.out or Path(__file__).parent / "results" / f"{name}.json")
    start = time.time()
    r: dict[str, Any] = {
        "machine": name,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "device_kind": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "rounds": rounds,
        "loadavg_start": os.getloadavg(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }
    print(f"{name}: jax {jax.__version__}, {os.cpu_count()} cores, loadavg {r['loadavg_start']}")
    r["bandwidth_probe"] = section_bandwidth(rounds)
    r["update_vs_floor"], _ = section_update(rounds)
    r["skipped_steps"] = section_skip(rounds)
    # One step is ~30 ms and other processes shift it by several percent: more rounds.
    r["train_step"], r["train_memory"] = section_train(max(rounds, 4 if args.quick else 15))
    r["update_memory"] = section_update_memory()
    r["peers"] = section_peers(sizes, rounds)
    r["loadavg_end"] = os.getloadavg()
    r["seconds"] = time.time() - start
    r["targets"] = evaluate(r)
    print_report(r)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(r, indent=1) + "\n")
    print(f"wrote {out} ({r['seconds']:.0f} s)")


if __name__ == "__main__":
    main()

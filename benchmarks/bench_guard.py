"""The guard for free, and what stochastic rounding costs: same-run ratios per update.

Run from the repository root (about a minute on 2 CPU cores with the defaults):

    PYTHONPATH=. python benchmarks/bench_guard.py [--rounds 5] [--total N]
        [--out benchmarks/results/guard-<machine>.json]

Rows, all jitted with the EMA donated, timed in interleaved rounds
(benchmarks/_timing.py), as ratios to the unguarded update (``nonfinite="propagate"``)
measured in the same rounds:

- the default guard (``nonfinite="skip"``), issue 19's target: <= 1.05x the best unguarded
  baseline (of the unguarded update, optax and torch, the one with the lowest median),
  as a paired ratio;
- the guard of version 0.3.0, ``where(isfinite(new), new, ema + (ema - ema))`` (one vector
  op more per 8 entries than today's ``ema + 0``);
- a control: the unguarded blend plus 4 vector ops that change nothing and select
  nothing (``new + ((ema - ema) - (p - p))``), as many as the guard adds: what that many
  ops cost in this loop, whatever they do;
- the previous formulation of the guard, ``where(isfinite(new), new, ema)``, whose
  select of the old value into the donated buffer XLA:CPU compiles to a masked store
  (``vmaskmovps``); ``where(..., ema + (ema - ema))`` stores plainly (see README.md);
- the streaming floor (one flat donated ``a + s * (b - a)`` over the same bytes);
- ``optax.incremental_update`` (jitted, donated);
- torch's ``torch._foreach_lerp_`` over the same leaves, when torch is installed;
- a bf16 EMA of bf16 parameters with ``rounding="stochastic"`` against ``"nearest"``.

Prints a table with the load average before and after, writes JSON.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import optax
from _timing import Candidate
from _timing import machine_name
from _timing import measure
from _timing import paired_ratio
from _timing import paired_ratio_quartiles
from _timing import summary
from _timing import write_results
from _workloads import param_tree

import ema_jax
from ema_jax import schedules

# PyTorch's OpenMP threads spin-wait by default: sharing 2 cores with XLA's thread pool,
# torch._foreach_lerp_ over 1M parameters in 161 leaves took 79 ms per update instead of
# 1.5-1.7 ms (load 4.5-6.8). Set before torch loads (torch_lerp imports it).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

PYCLS = dict(ema_alpha=1e-5, batch_size=128, max_epoch=200, update_period=1)
CALLS = 3  # calls per sample


def updater(ema: ema_jax.Ema, params: Any) -> tuple[Any, Any]:
    update = jax.jit(ema.update, donate_argnums=1)
    with warnings.catch_warnings():  # the bf16 EMA with round-to-nearest cannot move: the
        warnings.simplefilter("ignore", ema_jax.EmaPrecisionWarning)  # point of its row
        state = ema.init(params)
    return (lambda s: update(params, s)), state


def previous_guard(alpha: float, params: Any) -> tuple[Any, Any]:
    """The guard as it was: select the old EMA itself where the result is not finite."""

    def leaf(p: jax.Array, e: jax.Array) -> jax.Array:
        new = e + alpha * (p - e)
        return jnp.where(jnp.isfinite(new), new, e)

    update = jax.jit(lambda p, e: jax.tree.map(leaf, p, e), donate_argnums=1)
    return (lambda e: update(params, e)), jax.tree.map(jnp.copy, params)


def guard_030(alpha: float, params: Any) -> tuple[Any, Any]:
    """The guard of version 0.3.0: ``ema + (ema - ema)`` where the result is not finite."""

    def leaf(p: jax.Array, e: jax.Array) -> jax.Array:
        new = e + alpha * (p - e)
        return jnp.where(jnp.isfinite(new), new, e + (e - e))

    update = jax.jit(lambda p, e: jax.tree.map(leaf, p, e), donate_argnums=1)
    return (lambda e: update(params, e)), jax.tree.map(jnp.copy, params)


def four_ops(alpha: float, params: Any) -> tuple[Any, Any]:
    """The unguarded blend plus 4 vector ops (sub, sub, sub, add) and no select."""

    def leaf(p: jax.Array, e: jax.Array) -> jax.Array:
        new = e + alpha * (p - e)
        return new + ((e - e) - (p - p))

    update = jax.jit(lambda p, e: jax.tree.map(leaf, p, e), donate_argnums=1)
    return (lambda e: update(params, e)), jax.tree.map(jnp.copy, params)


def torch_lerp(alpha: float, params: Any) -> Candidate | None:
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(os.cpu_count() or 1)
    ps = [torch.from_numpy(np.asarray(x).copy()) for x in jax.tree.leaves(params)]
    es = [p.clone() for p in ps]

    def step(es: list[Any]) -> list[Any]:
        torch._foreach_lerp_(es, ps, alpha)
        return es

    return Candidate("torch._foreach_lerp_ (in place)", step, es, CALLS)


def section_guard(params: Any, rounds: int) -> dict[str, Any]:
    n = sum(x.size for x in jax.tree.leaves(params))
    nbytes = 3 * 4 * n
    alpha = schedules.pycls(**PYCLS).alpha
    flat = jnp.concatenate([x.reshape(-1) for x in jax.tree.leaves(params)])
    floor = jax.jit(lambda e, p: e + alpha * (p - e), donate_argnums=0)
    incremental = jax.jit(
        lambda e, p: optax.incremental_update(p, e, step_size=alpha), donate_argnums=0
    )
    cands = {
        "propagate": Candidate(
            "ema(pycls), nonfinite='propagate' (unguarded)",
            *updater(ema_jax.ema(schedules.pycls(**PYCLS), nonfinite="propagate"), params),
            CALLS,
            nbytes,
        ),
        "default": Candidate(
            "ema(pycls), default nonfinite='skip'",
            *updater(ema_jax.ema(schedules.pycls(**PYCLS)), params),
            CALLS,
            nbytes,
        ),
        "guard_030": Candidate(
            "0.3.0 guard: where(isfinite(new), new, e+(e-e))",
            *guard_030(alpha, params),
            CALLS,
            nbytes,
        ),
        "four_ops": Candidate(
            "control: unguarded + 4 vector ops, no select",
            *four_ops(alpha, params),
            CALLS,
            nbytes,
        ),
        "previous_guard": Candidate(
            "previous guard: where(isfinite(new), new, ema)",
            *previous_guard(alpha, params),
            CALLS,
            nbytes,
        ),
        "floor": Candidate(
            "floor: flat a+s*(b-a), donated",
            lambda e: floor(e, flat),
            flat.copy(),
            CALLS,
            nbytes,
        ),
        "optax": Candidate(
            "optax.incremental_update, donated",
            lambda e: incremental(e, params),
            jax.tree.map(jnp.copy, params),
            CALLS,
            nbytes,
        ),
    }
    torch_row = torch_lerp(alpha, params)
    if torch_row is not None:
        cands["torch"] = torch_row
    measure(list(cands.values()), rounds)
    out: dict[str, Any] = {"params": n, "leaves": len(jax.tree.leaves(params))}
    for key, c in cands.items():
        out[key] = summary(c) | {
            "label": c.name,
            "ratio_to_propagate": paired_ratio(c, cands["propagate"]),
            "ratio_quartiles": list(paired_ratio_quartiles(c, cands["propagate"])),
        }
    if torch_row is None:
        out["torch"] = "skipped: torch is not installed"
    else:
        import torch

        out["torch_info"] = {
            "version": torch.__version__,
            "threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        }
    # Issue 19's check: the default against the best unguarded baseline (lowest median).
    keys = [k for k in ("propagate", "optax", "torch") if k in cands]
    best = min(keys, key=lambda k: statistics.median(cands[k].samples))
    out["best_baseline"] = {
        "of": keys,
        "best": best,
        "label": cands[best].name,
        "ratio": paired_ratio(cands["default"], cands[best]),
        "ratio_quartiles": list(paired_ratio_quartiles(cands["default"], cands[best])),
    }
    out["target_met"] = out["best_baseline"]["ratio"] <= 1.05
    return out


def section_rounding(params: Any, rounds: int) -> dict[str, Any]:
    low = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    n = sum(x.size for x in jax.tree.leaves(low))
    schedule = schedules.constant(0.9999)
    cands = {
        rounding: Candidate(
            f"bf16 params and EMA, rounding='{rounding}'",
            *updater(ema_jax.ema(schedule, rounding=rounding), low),
            CALLS,
            3 * 2 * n,
        )
        for rounding in ("nearest", "stochastic")
    }
    measure(list(cands.values()), rounds)
    out: dict[str, Any] = {"params": n}
    for key, c in cands.items():
        out[key] = summary(c) | {
            "label": c.name,
            "ratio_to_nearest": paired_ratio(c, cands["nearest"]),
            "ratio_quartiles": list(paired_ratio_quartiles(c, cands["nearest"])),
        }
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--total", type=int, default=None, help="params (default: ResNet-50's)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    load_before = os.getloadavg()
    params = param_tree(args.total)  # None: ResNet-50's 25.6M parameters in 161 leaves
    guard = section_guard(params, args.rounds)
    rounding = section_rounding(params, args.rounds)
    load_after = os.getloadavg()
    result = {
        "machine": machine_name(),
        "platform": platform.platform(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "backend": jax.default_backend(),
        "rounds": args.rounds,
        "load_average_before": load_before,
        "load_average_after": load_after,
        "guard": guard,
        "rounding": rounding,
    }
    print(
        f"\nper update, {guard['params']:,} fp32 params in {guard['leaves']} leaves (median of"
        f" {args.rounds} rounds of {CALLS} calls; ratio: paired median [quartiles])"
    )
    print(f"  load average (1, 5, 15 min): before {load_before}, after {load_after}")
    print(f"  {'variant':<50} {'ms':>8} {'vs propagate':>13}")
    for row in guard.values():
        if isinstance(row, dict) and "median_ms" in row:
            lo, hi = row["ratio_quartiles"]
            print(
                f"  {row['label']:<50} {row['median_ms']:>8.2f}"
                f" {row['ratio_to_propagate']:>13.3f}  [{lo:.3f}-{hi:.3f}]"
            )
        elif isinstance(row, str):
            print(f"  torch: {row}")
    best = guard["best_baseline"]
    lo, hi = best["ratio_quartiles"]
    print(
        f"  default / best unguarded baseline ({best['label']}): {best['ratio']:.3f}"
        f"  [{lo:.3f}-{hi:.3f}]; <= 1.05x: {guard['target_met']}"
    )
    print(f"\nbf16 EMA of bf16 params, {rounding['params']:,} params, constant(0.9999)")
    for key in ("nearest", "stochastic"):
        row = rounding[key]
        lo, hi = row["ratio_quartiles"]
        print(
            f"  {row['label']:<50} {row['median_ms']:>8.2f} {row['ratio_to_nearest']:>13.3f}"
            f"  [{lo:.3f}-{hi:.3f}]"
        )
    write_results(result, "guard", args.out)


if __name__ == "__main__":
    main()

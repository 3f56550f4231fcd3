"""The one core's default against the streaming floor, and K EMAs in one pass vs K apart.

Run from the repository root (about 2 minutes on 2 CPU cores):

    PYTHONPATH=. python benchmarks/bench_schedules.py [--quick] [--rounds 7]
        [--out benchmarks/results/schedules-<machine>.json]

Everything is a ratio to a baseline timed in the same run, interleaved round by round
(benchmarks/_timing.py): the default ``ema(schedule)`` per update against a donated
flat ``a + s*(b - a)`` on the same bytes (issue 10's target: <= 1.10x), each guard
setting and a traced (step-dependent) step size beside it; and K averages in one
``ema((s1, ..., sK))`` against K separate single updates (issue 12's target: <= 1.10 x
(2K+1)/(3K), the ratio of parameter-sized streams). Prints tables, writes JSON.
"""

from __future__ import annotations

import argparse
import platform
from typing import Any

import jax
import jax.numpy as jnp
import jaxlib
from _timing import Candidate
from _timing import machine_name
from _timing import measure
from _timing import paired_ratio
from _timing import paired_ratio_quartiles
from _timing import summary
from _timing import write_results
from _workloads import copy_tree
from _workloads import param_tree

import ema_jax
from ema_jax import schedules

PYCLS = dict(ema_alpha=1e-5, batch_size=128, max_epoch=200, update_period=1)


def updater(ema: ema_jax.Ema, params: Any) -> tuple[Any, Any]:
    update = jax.jit(ema.update, donate_argnums=1)
    return (lambda s: update(params, s)), ema.init(params)


def section_default(params: Any, rounds: int) -> dict[str, Any]:
    """Issue 10: the default configuration per update, against the streaming floor."""
    n = sum(x.size for x in jax.tree.leaves(params))
    nbytes = 3 * 4 * n
    a = schedules.pycls(**PYCLS).alpha
    flat = jnp.concatenate([x.reshape(-1) for x in jax.tree.leaves(params)])
    floor = jax.jit(lambda e, p: e + a * (p - e), donate_argnums=0)
    cands = {
        "floor": Candidate(
            "floor: flat XLA a+s*(b-a), donated", lambda e: floor(e, flat), flat.copy(), 5, nbytes
        )
    }
    variants = {
        "default": ("ema(pycls), default nonfinite='skip'", ema_jax.ema(schedules.pycls(**PYCLS))),
        "propagate": (
            "ema(pycls), nonfinite='propagate'",
            ema_jax.ema(schedules.pycls(**PYCLS), nonfinite="propagate"),
        ),
        "skip_and_count": (
            "ema(pycls), nonfinite='skip_and_count'",
            ema_jax.ema(schedules.pycls(**PYCLS), nonfinite="skip_and_count"),
        ),
        "normalized_ema": (
            "normalized_ema(...) defaults (skip_and_count)",
            ema_jax.normalized_ema(**PYCLS),
        ),
        "traced_alpha": (
            "ema(warmup_power), default: a step-dependent alpha",
            ema_jax.ema(schedules.warmup_power()),
        ),
        "constant": (
            "ema(constant(0.9999, form='nnx')), default: nnx.EMA's blend",
            ema_jax.ema(schedules.constant(0.9999, form="nnx")),
        ),
    }
    for key, (label, ema) in variants.items():
        step, state = updater(ema, params)
        cands[key] = Candidate(label, step, state, 5, nbytes)
    measure(list(cands.values()), rounds)
    out: dict[str, Any] = {"params": n, "leaves": len(jax.tree.leaves(params))}
    for key, c in cands.items():
        lo, hi = paired_ratio_quartiles(c, cands["floor"])
        out[key] = summary(c) | {
            "label": c.name,
            "ratio_to_floor": paired_ratio(c, cands["floor"]),
            "ratio_quartiles": [lo, hi],
        }
    out["target_met"] = out["default"]["ratio_to_floor"] <= 1.10
    return out


def section_several(params: Any, rounds: int, ks: tuple[int, ...]) -> dict[str, Any]:
    """Issue 12: K averages in one pass against K separate single updates."""
    out: dict[str, Any] = {}
    for k in ks:
        decays = [schedules.constant(1 - 10.0 ** -(2 + j)) for j in range(k)]
        separate = []
        for s in decays:
            step, state = updater(ema_jax.ema(s), params)
            separate.append((step, state))

        def run_separate(states, separate=separate):
            return [step(s) for (step, _), s in zip(separate, states, strict=True)]

        one_step, one_state = updater(ema_jax.ema(tuple(decays)), params)
        cands = {
            "separate": Candidate(
                f"{k} separate ema(constant) updates",
                run_separate,
                [copy_tree(s) for _, s in separate],
                3,
            ),
            "one_pass": Candidate(f"ema(({k} schedules)) in one pass", one_step, one_state, 3),
        }
        measure(list(cands.values()), rounds)
        ratio = paired_ratio(cands["one_pass"], cands["separate"])
        target = 1.10 * (2 * k + 1) / (3 * k)
        lowered = jax.jit(ema_jax.ema(tuple(decays)).update, donate_argnums=1).lower(
            params, one_state
        )
        memory = lowered.compile().memory_analysis()
        out[str(k)] = {
            "separate": summary(cands["separate"]),
            "one_pass": summary(cands["one_pass"]),
            "ratio": ratio,
            "ratio_quartiles": list(paired_ratio_quartiles(cands["one_pass"], cands["separate"])),
            "streams_ratio": (2 * k + 1) / (3 * k),
            "target": target,
            "target_met": ratio <= target,
            "temp_bytes": memory.temp_size_in_bytes,
            "alias_bytes": memory.alias_size_in_bytes,
            "state_bytes": sum(x.nbytes for x in jax.tree.leaves(one_state)),
        }
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller tree, fewer rounds")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 7)
    total = 2_000_000 if args.quick else None  # None: ResNet-50's 25.6M in 161 leaves
    params = param_tree(total)
    default = section_default(params, rounds)
    several = section_several(param_tree(total or 8_000_000), rounds, (2, 3, 4))
    result = {
        "machine": machine_name(),
        "platform": platform.platform(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "backend": jax.default_backend(),
        "rounds": rounds,
        "default": default,
        "several": several,
    }
    print(
        f"\nper update, {default['params']:,} params in {default['leaves']} leaves"
        f" (median of {rounds} rounds; ratio: paired median, quartiles)"
    )
    print(f"  {'variant':<52} {'ms':>8} {'vs floor':>9}")
    for row in default.values():
        if isinstance(row, dict):
            lo, hi = row["ratio_quartiles"]
            print(
                f"  {row['label']:<52} {row['median_ms']:>8.3f} {row['ratio_to_floor']:>9.3f}"
                f"  [{lo:.3f}-{hi:.3f}]"
            )
    print(f"  default <= 1.10x the floor: {default['target_met']}")
    print("\nK averages in one pass vs K separate updates (8M params unless --quick)")
    print(
        f"  {'K':>2} {'one pass ms':>12} {'separate ms':>12} {'ratio':>7} {'target':>7}"
        f" {'met':>5} {'temp bytes':>11}"
    )
    for k, row in several.items():
        print(
            f"  {k:>2} {row['one_pass']['median_ms']:>12.3f} {row['separate']['median_ms']:>12.3f}"
            f" {row['ratio']:>7.3f} {row['target']:>7.3f} {row['target_met']!s:>5}"
            f" {row['temp_bytes']:>11,}"
        )
    write_results(result, "schedules", args.out)


if __name__ == "__main__":
    main()

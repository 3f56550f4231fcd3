"""`ema_jax.nnx.Ema` against flax's `nnx.EMA`: the per-update cost on the same model, same run.

Run from the repository root (about 1-2 minutes on 2 CPU cores):

    PYTHONPATH=. python benchmarks/bench_nnx.py [--rounds 9] [--out PATH]

Each candidate updates an EMA of the same model's ``nnx.Param`` variables, called two
ways: ``nnx.jit`` over ``(ema, model)``, both donated (the graph-mode call an NNX user
writes; donating the model spares nnx.jit a copy of it, as a train step does anyway),
and ``jax.jit`` over ``nnx.split``/``nnx.merge`` with the EMA's state donated (the
kernel without nnx.jit's Python). Ours runs every call (``update_period=1``), except
the period-32 row, which is the cost per call averaged over 32 calls. Ratios are
ours / ``nnx.EMA`` round by round, then the median (benchmarks/_timing.py). Prints a
table; writes every sample to ``benchmarks/results/nnx-<machine>.json``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import time
from pathlib import Path
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
from flax import nnx

import ema_jax
from ema_jax import nnx as ema_nnx

HYPER = dict(ema_alpha=1e-5, batch_size=128, max_epoch=200)  # pycls's defaults


class Mlp(nnx.Module):
    """``depth`` square Linear layers of ``width``: few, large leaves."""

    def __init__(self, width: int, depth: int, rngs: nnx.Rngs):
        self.layers = nnx.List([nnx.Linear(width, width, rngs=rngs) for _ in range(depth)])


MODELS = {
    # 4.2M parameters in 8 leaves: the update is memory-bound.
    "mlp_4M_8_leaves": dict(width=1024, depth=4, calls=20),
    # 0.2M parameters in 96 leaves: per-leaf and per-call overheads show; under nnx.jit
    # its Python (the same for both EMAs) is most of the time.
    "mlp_0.2M_96_leaves": dict(width=64, depth=48, calls=50),
}


def transforms() -> dict[str, tuple[str, Any]]:
    """Our candidates: label, transform."""
    pycls = ema_jax.schedules.pycls
    return {
        "ours_skip": (
            "ema(pycls), default guard (skip, no count)",
            ema_jax.ema(pycls(**HYPER, update_period=1)),
        ),
        "ours_skip_and_count": (
            "ema(pycls), skip_and_count (normalized_ema's default)",
            ema_jax.ema(pycls(**HYPER, update_period=1), nonfinite="skip_and_count"),
        ),
        "ours_no_guard": (
            "ema(pycls), no guard (propagate)",
            ema_jax.ema(pycls(**HYPER, update_period=1), nonfinite="propagate"),
        ),
        "ours_skip_p32": (
            "ema(pycls), default guard, period 32 (per call)",
            ema_jax.ema(pycls(**HYPER, update_period=32)),
        ),
        "ours_constant": (
            "ema(schedules.constant), default guard",
            ema_jax.ema(ema_jax.schedules.constant(0.999)),
        ),
    }


def nnx_jit_candidate(name: str, model: Any, ema: Any, calls: int) -> Candidate:
    update = nnx.jit(lambda ema, model: ema.update(model), donate_argnums=(0, 1))

    def step(state: tuple[Any, Any]) -> Any:
        update(*state)
        return state

    return Candidate(name, step, (ema, model), calls)


def split_merge_candidate(name: str, model: Any, ema: Any, calls: int) -> Candidate:
    ema_def, ema_state = nnx.split(ema)
    model_def, model_state = nnx.split(model)

    @functools.partial(jax.jit, donate_argnums=0)
    def update(ema_state: Any, model_state: Any) -> Any:
        ema = nnx.merge(ema_def, ema_state)
        ema.update(nnx.merge(model_def, model_state))
        return nnx.state(ema)

    return Candidate(name, lambda s: update(s, model_state), ema_state, calls)


def section(spec: dict[str, int], rounds: int) -> dict[str, Any]:
    """Every candidate on one model, both ways of calling; ratios to nnx.EMA."""
    out: dict[str, Any] = {}
    ours = transforms()
    for mode, make in (("nnx_jit", nnx_jit_candidate), ("jax_jit", split_merge_candidate)):
        model = Mlp(spec["width"], spec["depth"], nnx.Rngs(0))
        # The same weights as the model's, in a buffer of its own for each candidate.
        theirs = nnx.EMA(model, 0.999, only=nnx.Param)
        cands = {"nnx_EMA": make("nnx.EMA(decay=0.999)", model, theirs, spec["calls"])}
        for key, (label, transform) in ours.items():
            ema = ema_nnx.Ema(model, transform, only=nnx.Param)
            cands[key] = make(label, model, ema, spec["calls"])
        measure(list(cands.values()), rounds)
        res: dict[str, Any] = {k: summary(c) | {"label": c.name} for k, c in cands.items()}
        for k, c in cands.items():
            res[k]["ratio_to_nnx_ema"] = paired_ratio(c, cands["nnx_EMA"])
            res[k]["ratio_q1_q3"] = paired_ratio_quartiles(c, cands["nnx_EMA"])
        out[mode] = res
    params = Mlp(spec["width"], spec["depth"], nnx.Rngs(0))
    out["params"] = sum(x.size for x in jax.tree.leaves(nnx.state(params, nnx.Param)))
    out["leaves"] = len(jax.tree.leaves(nnx.state(params, nnx.Param)))
    return out


def print_report(r: dict[str, Any]) -> None:
    for name, res in r["models"].items():
        print(f"\n{name}: {res['params']:,} params in {res['leaves']} leaves, only=nnx.Param")
        cols = [f"{mode + ' ms':>15s} {'ratio [IQR]':>21s}" for mode in ("nnx.jit", "jax.jit")]
        print(f"  {'':<58s}{cols[0]}  {cols[1]}")
        for key in res["nnx_jit"]:
            cells = []
            for mode in ("nnx_jit", "jax_jit"):
                c = res[mode][key]
                q1, q3 = c["ratio_q1_q3"]
                cells.append(
                    f"{c['median_ms']:15.3f} {c['ratio_to_nnx_ema']:6.3f} [{q1:5.2f}..{q3:5.2f}]"
                )
            print(f"  {res['nnx_jit'][key]['label']:<58s}{cells[0]}  {cells[1]}")
    if "ours_constant" not in r["models"][next(iter(r["models"]))]["nnx_jit"]:
        print("\n(ema_jax.ema / schedules.constant not in this build: that row is left out)")
    print(f"\nloadavg start {r['loadavg_start']}, end {r['loadavg_end']}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds")
    parser.add_argument("--out", default=None, help="JSON path")
    args = parser.parse_args(argv)
    name = machine_name()
    out = Path(args.out or Path(__file__).parent / "results" / f"nnx-{name}.json")
    start = time.time()
    r: dict[str, Any] = {
        "machine": name,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "device_kind": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "flax": __import__("flax").__version__,
        "optax": optax.__version__,
        "numpy": np.__version__,
        "rounds": args.rounds,
        "loadavg_start": os.getloadavg(),
    }
    print(f"{name}: jax {jax.__version__}, flax {r['flax']}, loadavg {r['loadavg_start']}")
    r["models"] = {k: section(spec, args.rounds) for k, spec in MODELS.items()}
    r["loadavg_end"] = os.getloadavg()
    r["seconds"] = time.time() - start
    print_report(r)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(r, indent=1) + "\n")
    print(f"wrote {out} ({r['seconds']:.0f} s)")


if __name__ == "__main__":
    jnp.zeros(())  # start the backend before timing anything
    main()

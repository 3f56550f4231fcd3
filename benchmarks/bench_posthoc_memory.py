"""Peak memory of ``python -m ema_jax posthoc`` for 1 and 24 widths (issue 19.3).

Writes snapshots of a model of ``--weights`` float32 weights (one leaf, the worst case
for reading leaf by leaf; ``--leaves`` splits it), then runs the CLI in a fresh
subprocess per measurement and reads its peak resident set size
(``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss`` of a wrapper that runs only it).
The ratio 24 widths / 1 width is the target (<= 1.3); ``import ema_jax`` alone is the
floor every run pays.

Run: PYTHONPATH=. python benchmarks/bench_posthoc_memory.py [--weights 4194304]
     [--snapshots 8] [--rounds 2] [--pythonpath DIR]  (DIR: another checkout to compare)
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
WRAPPER = """
import resource, subprocess, sys, time
start = time.perf_counter()
proc = subprocess.run(sys.argv[1:], capture_output=True, text=True)
seconds = time.perf_counter() - start
if proc.returncode != 0:
    sys.exit(proc.stderr)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, seconds)
"""


def write_snapshots(directory: str, weights: int, leaves: int, count: int) -> None:
    import jax
    import jax.numpy as jnp

    from ema_jax import posthoc

    ema = posthoc.trackers((0.05, 0.10), batch_size=256)
    size = weights // leaves
    keys = jax.random.split(jax.random.key(0), leaves)
    params = {f"w{k}": jax.random.normal(keys[k], (size,), jnp.float32) for k in range(leaves)}
    state = ema.init(params)
    update = jax.jit(ema.update)
    with posthoc.Snapshots(directory, snapshot_every=1) as snapshots:
        for step in range(1, count + 1):
            params = jax.tree.map(lambda p: p * 0.99 + 0.01, params)
            state = update(params, state)
            snapshots.save(state, ema=ema, step=step)


def peak(command: list[str], env: dict[str, str], cwd: str) -> tuple[float, float]:
    """Peak RSS (MiB) and wall time (s) of ``command`` alone in a fresh process.

    ``cwd`` outside any checkout: ``python -m`` puts the working directory first on
    ``sys.path``, which would override PYTHONPATH.
    """
    out = subprocess.run(
        [sys.executable, "-c", WRAPPER, *command],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        check=True,
    ).stdout.split()
    kib, seconds = int(out[0]), float(out[1])
    scale = 1 if sys.platform != "darwin" else 1 / 1024  # macOS reports bytes
    return kib * scale / 1024, seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=int, default=2**22)
    parser.add_argument("--leaves", type=int, default=1)
    parser.add_argument("--snapshots", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--pythonpath", default=str(ROOT), help="the ema_jax checkout to run")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    checkout = os.path.abspath(args.pythonpath)
    env = dict(os.environ, PYTHONPATH=checkout, JAX_PLATFORMS="cpu")
    widths = {1: [0.07], 24: [float(s) for s in np.round(np.linspace(0.05, 0.10, 24), 4)]}
    rows: dict[str, list[list[float]]] = {"import": [], "1": [], "24": []}
    with tempfile.TemporaryDirectory() as tmp:
        snapshots = os.path.join(tmp, "snapshots")
        write_snapshots(snapshots, args.weights, args.leaves, args.snapshots)
        where = subprocess.run(
            [sys.executable, "-c", "import ema_jax; print(ema_jax.__file__)"],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp,
            check=True,
        ).stdout.strip()
        assert where.startswith(checkout), (where, checkout)
        # A flag the old CLI lacks is left out there: it wrote every width without one.
        help_text = subprocess.run(
            [sys.executable, "-m", "ema_jax", "posthoc", "--help"],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp,
            check=True,
        ).stdout
        allow = ["--allow-extrapolation"] if "--allow-extrapolation" in help_text else []
        for round_ in range(args.rounds):  # interleaved, so that load drifts hit both
            rows["import"].append(list(peak([sys.executable, "-c", "import ema_jax"], env, tmp)))
            for count, targets in widths.items():
                out = os.path.join(tmp, f"out_{round_}_{count}")
                command = [sys.executable, "-m", "ema_jax", "posthoc", "--dir", snapshots,
                           "--sigma-rel", ",".join(f"{s:g}" for s in targets), "--out", out,
                           *allow]  # fmt: skip
                rows[str(count)].append(list(peak(command, env, tmp)))
    best = {k: min(r[0] for r in v) for k, v in rows.items()}
    ratio = best["24"] / best["1"]
    print(
        f"python -m ema_jax posthoc, {args.weights} float32 weights in {args.leaves} leaves,"
        f" 2 tracked averages, {args.snapshots} snapshots; checkout {checkout}"
    )
    print(f"{'run':>22}  {'peak RSS (MiB)':>14}  {'wall (s)':>8}")
    for name, label in (("import", "import ema_jax"), ("1", "1 width"), ("24", "24 widths")):
        seconds = min(r[1] for r in rows[name])
        print(f"{label:>22}  {best[name]:>14.0f}  {seconds:>8.1f}")
    print(f"24 widths / 1 width: {ratio:.2f} (target <= 1.3)")
    result = {
        "weights": args.weights,
        "leaves": args.leaves,
        "snapshots": args.snapshots,
        "checkout": checkout,
        "samples_mib_s": rows,
        "peak_mib": best,
        "ratio_24_over_1": ratio,
        "target_met": ratio <= 1.3,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    path = args.out or str(
        ROOT / "benchmarks" / "results" / "posthoc-memory-cpu-2core-amd-epyc.json"
    )
    pathlib.Path(path).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

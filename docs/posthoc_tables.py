"""The numbers in ``docs/posthoc.md``, computed, and the script that writes them there.

Run: python docs/posthoc_tables.py            (rewrites the generated blocks)
     python docs/posthoc_tables.py --check    (exit 1 if the doc is out of date)
     python docs/posthoc_tables.py --measure  (also re-measures the timings block)
     python docs/posthoc_tables.py --measure-bf16  (reruns the digits example with
         float32 and bfloat16 snapshots into docs/posthoc_bf16.json, a few minutes)

``tests/test_posthoc_doc.py`` checks that the doc holds the computed tables verbatim
(the ``bf16`` table as rendered from docs/posthoc_bf16.json); the ``measured`` block
(timings, bytes on disk) depends on the machine and is only checked for its presence.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import pathlib
import platform
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ema_jax import posthoc  # noqa: E402
from ema_jax import schedules  # noqa: E402

import generated_blocks  # noqa: E402

DOC = ROOT / "docs" / "posthoc.md"
BF16_JSON = ROOT / "docs" / "posthoc_bf16.json"
BF16_RUNS = (("--quick",), ("--epochs", "5", "--snapshot-every", "10"))  # the example's
BF16_WIDTHS = (0.03, 0.07, 0.15)
TRACKED = (0.05, 0.10)
TARGETS = (0.03, 0.07, 0.15, 0.25)
COUNTS = (10, 20, 50, 100, 200, 400)  # snapshots per tracked average
MODELS = (("1M", 1e6), ("ResNet-50", 25.6e6), ("ViT-B/16", 86.6e6), ("1B", 1e9))
STORAGE = ("float32", "bfloat16", "float16")
UNIT_ROUNDOFF = {"float32": 2.0**-24, "bfloat16": 2.0**-8, "float16": 2.0**-11}
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def profiles(count: int) -> tuple[np.ndarray, np.ndarray]:
    """Times and exponents of ``count`` evenly spaced snapshots of each tracked average.

    The times are 1, 2, ..., count: the weights and the condition numbers do not
    change when every time is scaled (the inner products scale by 1/c), so only the
    number of snapshots matters, not ``snapshot_every`` or the batch size.
    """
    times = np.tile(np.arange(1.0, count + 1), len(TRACKED))
    gammas = np.repeat([schedules.gamma_of_sigma_rel(s) for s in TRACKED], count)
    return times, gammas


@functools.cache
def conditioning_rows() -> tuple[tuple[float, ...], ...]:
    """``(count, cond(A), cond(scaled A), rank used, size)`` per number of snapshots."""
    rows: list[tuple[float, ...]] = []
    for count in COUNTS:
        times, gammas = profiles(count)
        a = posthoc.profile_inner(times[:, None], gammas[:, None], times[None], gammas[None])
        solution = posthoc.solve(times, gammas, time=float(count), gamma=gammas[-1])
        rows.append((count, np.linalg.cond(a), solution.cond, solution.rank, len(times)))
    return tuple(rows)  # cached: immutable


def growth_exponent(rows: Sequence[tuple[float, ...]]) -> float:
    """The slope of log cond(A) against log(count): cond(A) grows about as count**slope."""
    counts = np.log([r[0] for r in rows])
    conds = np.log([r[1] for r in rows])
    return float(np.polyfit(counts, conds, 1)[0])


@functools.cache
def accuracy_rows() -> tuple[tuple[float, ...], ...]:
    """``(count, residual and sum|x| per target...)``: how well the snapshots fit each target."""
    rows = []
    for count in COUNTS:
        times, gammas = profiles(count)
        row: list[float] = [count]
        for target in TARGETS:
            gamma = schedules.gamma_of_sigma_rel(target)
            solution = posthoc.solve(times, gammas, time=float(count), gamma=gamma)
            row += [solution.residual, float(np.abs(solution.weights).sum())]
        rows.append(tuple(row))
    return tuple(rows)  # cached: immutable


def disk_rows(count: int = 100) -> list[tuple[str, float, float, float]]:
    """``(model, MiB per snapshot, GiB for count snapshots)`` per storage dtype, K = 2."""
    rows = []
    for name, params in MODELS:
        for dtype in ("float32", "bfloat16"):
            per = params * len(TRACKED) * BYTES[dtype]
            rows.append((name, params, dtype, per / 2**20, count * per / 2**30))
    return rows


def offset_of(residual: float, sigma_rel: float = 0.07) -> float:
    """The relative change of ``sigma_rel`` whose profile is ``residual`` away (relative L2)."""
    gamma = schedules.gamma_of_sigma_rel(sigma_rel)
    own = float(posthoc.profile_inner(1.0, gamma, 1.0, gamma))

    def distance(factor: float) -> float:
        other = schedules.gamma_of_sigma_rel(sigma_rel * factor)
        cross = float(posthoc.profile_inner(1.0, other, 1.0, gamma))
        mine = float(posthoc.profile_inner(1.0, other, 1.0, other))
        return math.sqrt(max(own - 2 * cross + mine, 0.0) / own)

    low, high = 1.0, 1.5  # bisection on the widening factor
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if distance(middle) < residual else (low, middle)
    return low - 1.0


def threshold_rows() -> list[tuple[str, float, float]]:
    """``(what happens, residual, width offset with that profile distance at 0.07)``."""
    return [
        ("ExtrapolationWarning", posthoc.WARN_RESIDUAL, offset_of(posthoc.WARN_RESIDUAL)),
        ("ExtrapolationError", posthoc.MAX_RESIDUAL, offset_of(posthoc.MAX_RESIDUAL)),
    ]


def measure_bf16() -> dict[str, object]:
    """The digits example's reconstructions from float32 and from bfloat16 snapshots, for
    each run of BF16_RUNS (one training run each, snapshotted both ways)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "posthoc_digits", ROOT / "examples" / "posthoc_digits.py"
    )
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    runs = []
    for args in BF16_RUNS:
        run: dict[str, object] = {"args": list(args)}
        for dtype in ("float32", "bfloat16"):
            with tempfile.TemporaryDirectory() as workdir:
                argv = [*args, "--no-plot", "--workdir", workdir, "--direct", "0.03,0.07,0.15"]
                if dtype != "float32":
                    argv += ["--snapshot-dtype", dtype]
                result = example.main(argv)
            run["snapshots"] = len(result["steps"])
            run[dtype] = {
                f"{r['sigma_rel']:g}": {
                    "test_loss": r["loss"],
                    "val_loss": r["val_loss"],
                    "residual": r["residual"],
                }
                for r in result["rows"]
                if r["sigma_rel"] in BF16_WIDTHS
            }
        runs.append(run)
    return {"runs": runs}


def bf16_table(data: dict) -> str:  # type: ignore[type-arg]
    """The losses of each width from float32 and bfloat16 snapshots, and the shifts."""
    lines = [
        "| run (`examples/posthoc_digits.py ...`) | snapshots per average | sigma_rel"
        " | residual | validation loss: float32, bfloat16 snapshots | test loss: float32,"
        " bfloat16 snapshots | test loss shift |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for run in data["runs"]:
        f32, bf16 = run["float32"], run["bfloat16"]
        for width in BF16_WIDTHS:
            a, b = f32[f"{width:g}"], bf16[f"{width:g}"]
            lines.append(
                f"| `{' '.join(run['args'])}` | {run['snapshots']} | {width:g}"
                f" | {a['residual']:.1e} | {a['val_loss']:.4f}, {b['val_loss']:.4f}"
                f" | {a['test_loss']:.4f}, {b['test_loss']:.4f}"
                f" | {b['test_loss'] - a['test_loss']:+.4f} |"
            )
    return "\n".join(lines)


def markdown_tables() -> dict[str, str]:
    cond = conditioning_rows()
    lines = [
        "| snapshots per average | size of A | cond(A) | cond(A scaled to unit diagonal)"
        " | rank used |",
        "|---:|---:|---:|---:|---:|",
    ]
    for count, raw, scaled, rank, size in cond:
        lines.append(f"| {count} | {size} | {raw:.2e} | {scaled:.2e} | {rank} |")
    tables = {"conditioning": "\n".join(lines)}
    tables["growth"] = (
        f"cond(A) grows about as (snapshots per average) ** {growth_exponent(cond):.2f}"
    )

    head = " | ".join(f"{t:g}: residual, sum abs x" for t in TARGETS)
    lines = [f"| snapshots per average | {head} |", "|---:|" + "---:|" * len(TARGETS)]
    for count, *values in accuracy_rows():
        cells = " | ".join(
            f"{values[2 * k]:.1e}, {values[2 * k + 1]:.2f}" for k in range(len(TARGETS))
        )
        lines.append(f"| {count} | {cells} |")
    tables["accuracy"] = "\n".join(lines)

    lines = [
        "| model | parameters | storage dtype | per snapshot (MiB) | 100 snapshots (GiB) |",
        "|---|---:|---|---:|---:|",
    ]
    for name, params, dtype, mib, gib in disk_rows():
        lines.append(f"| {name} | {params:.3g} | {dtype} | {mib:.1f} | {gib:.1f} |")
    tables["disk"] = "\n".join(lines)

    lines = ["| storage dtype | bytes per weight | unit roundoff u (relative error per weight) |"]
    lines.append("|---|---:|---:|")
    for dtype in STORAGE:
        u = UNIT_ROUNDOFF[dtype]
        lines.append(f"| {dtype} | {BYTES[dtype]} | 2^{int(math.log2(u))} = {u:.2e} |")
    tables["storage"] = "\n".join(lines)

    lines = ["| residual above | reconstruct gives | a width this much wider is as far from 0.07 |"]
    lines.append("|---:|---|---:|")
    for what, residual, offset in threshold_rows():
        lines.append(f"| {residual:g} | {what} | {100 * offset:.1f}% |")
    tables["thresholds"] = "\n".join(lines)
    if BF16_JSON.exists():
        tables["bf16"] = bf16_table(json.loads(BF16_JSON.read_text(encoding="utf-8")))
    return tables


def measure(params: int = 2**20, count: int = 20) -> str:
    """Times one machine: saving and reconstructing a model of ``params`` float32 weights."""
    import jax
    import jax.numpy as jnp

    ema = posthoc.trackers(batch_size=1)
    # Random weights: zeros would compress to nothing on disk.
    model = {"w": jax.random.normal(jax.random.key(0), (params,), jnp.float32)}
    state = ema.update(model, ema.init(model))
    lines = [
        f"Measured on {platform.machine()} with {os.cpu_count()} CPU cores, jax"
        f" {jax.__version__}, a model of {params} float32 weights, 2 tracked averages,"
        f" {count} snapshots:",
        "",
        "| what | float32 snapshots | bfloat16 snapshots |",
        "|---|---:|---:|",
    ]
    cells: dict[str, list[str]] = {}
    for dtype in ("float32", "bfloat16"):
        with tempfile.TemporaryDirectory() as directory:
            with posthoc.Snapshots(directory, snapshot_every=1, dtype=dtype) as snapshots:
                start = time.perf_counter()
                for step in range(1, count + 1):
                    state = state._replace(step=jnp.asarray(step, jnp.int32))
                    snapshots.save(state, ema=ema, step=step)
                snapshots.wait_until_finished()
                save = (time.perf_counter() - start) / count
            disk = sum(
                os.path.getsize(os.path.join(folder, name))
                for folder, _, names in os.walk(directory)
                for name in names
            )
            timings = []
            for targets in ([0.07], [0.03, 0.07, 0.15, 0.2, 0.25]):
                start = time.perf_counter()
                with warnings.catch_warnings():  # 0.03 and 0.25 from 20 snapshots: flagged
                    warnings.simplefilter("ignore", posthoc.ExtrapolationWarning)
                    posthoc.reconstruct(directory, targets, allow_extrapolation=True)
                timings.append(time.perf_counter() - start)
        cells.setdefault("save, per snapshot (s)", []).append(f"{save:.3f}")
        cells.setdefault("disk, per snapshot (MiB)", []).append(f"{disk / count / 2**20:.2f}")
        cells.setdefault("reconstruct 1 sigma_rel (s)", []).append(f"{timings[0]:.2f}")
        cells.setdefault("reconstruct 5 sigma_rels (s)", []).append(f"{timings[1]:.2f}")
    lines += [f"| {what} | {' | '.join(values)} |" for what, values in cells.items()]
    for n in (100, 400):
        times, gammas = profiles(n)
        start = time.perf_counter()
        posthoc.solve(times, gammas, time=float(n), gamma=schedules.gamma_of_sigma_rel(0.07))
        seconds = time.perf_counter() - start
        lines.append(f"| the solve alone, {n} snapshots per average (s) | {seconds:.3f} | |")
    return "\n".join(lines)


def fill(doc: str, tables: dict[str, str]) -> str:
    """``doc`` with every generated block replaced by its current content."""
    return generated_blocks.fill(doc, tables, "docs/posthoc.md")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check, write nothing")
    parser.add_argument("--measure", action="store_true", help="also re-measure the timings")
    parser.add_argument(
        "--measure-bf16", action="store_true", help="rerun the example into posthoc_bf16.json"
    )
    args = parser.parse_args()
    if args.measure_bf16:
        BF16_JSON.write_text(json.dumps(measure_bf16(), indent=1) + "\n", encoding="utf-8")
    text = DOC.read_text(encoding="utf-8")
    tables = markdown_tables()
    if args.measure:
        tables["measured"] = measure()
    new = fill(text, tables)
    return generated_blocks.write_or_check(DOC, new, "docs/posthoc_tables.py", args.check)


if __name__ == "__main__":
    sys.exit(main())

"""Does pycls's normalized EMA free you from retuning when batch size and schedule length change?

Trains the digits CNN at every batch size and schedule length of a grid, several seeds
each, and in every run tracks, in one ``ema_jax.ema`` transform, pycls's rule
(``schedules.pycls``, linear and exact) at a grid of ``ema_alpha`` values and fixed
per-step decays (``schedules.constant``); records the test accuracy of every average
and of the raw weights after every epoch. Then compares one global ``ema_alpha`` and
one global decay against the best of each configuration (``invariance_report.py``).

Run (not part of the test suite):
  python experiments/invariance.py             # the sweep (~13 min on 2 shared cores)
  python experiments/invariance.py --quick     # a 2x2, one-seed version (~30 s)
  python experiments/invariance.py --write-doc # docs/invariance.md from the JSON
  python experiments/invariance.py --check-doc # exit 1 if the doc is out of date
  python experiments/invariance.py --summarize # the JSON's summary and the plot, again

The sweep writes ``experiments/results/invariance.json`` (every number: the correct
counts per seed, epoch and average, the settings, the summary) and ``invariance.png``;
``--quick`` writes into ``workdir/invariance-quick/``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys
import time
from collections.abc import Sequence
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

import invariance_doc as doc  # noqa: E402
import invariance_report as report  # noqa: E402

RESULTS = ROOT / "experiments" / "results"
DOC = ROOT / "docs" / "invariance.md"
JSON_PATH = RESULTS / "invariance.json"

BATCH_SIZES = (8, 16, 32, 64)  # 8x
EPOCHS = (10, 20, 40)  # 4x
SEEDS = (0, 1, 2, 3, 4)
# Log-spaced, a quarter decade apart: ema_alpha from 10**-3.5 to 10**-0.5, and 1 - decay
# over the same range (half-lives from about 1 to 2200 steps).
EXPONENTS = tuple(-3.5 + 0.25 * i for i in range(13))
BASE_LR = 0.25  # at batch 32; the example's 2.0 diverges without BatchNorm
WEIGHT_DECAY = 5e-4  # pycls's OPTIM.WEIGHT_DECAY: keeps the raw weights noisy to the end

QUICK_BATCH_SIZES = (16, 64)
QUICK_EPOCHS = (5, 10)
QUICK_SEEDS = (0,)
QUICK_EXPONENTS = tuple(-3.5 + 0.5 * i for i in range(7))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 batch sizes x 2 lengths, 1 seed")
    parser.add_argument("--out", default=None, help="output folder (JSON and plot)")
    parser.add_argument("--write-doc", action="store_true", help="only rewrite the doc")
    parser.add_argument("--check-doc", action="store_true", help="only check the doc")
    parser.add_argument(
        "--summarize",
        action="store_true",
        help="only recompute the JSON's summary and the plot from its counts",
    )
    return parser.parse_args(argv)


def load_results(path: pathlib.Path = JSON_PATH) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def doc_text(data: dict[str, Any], text: str) -> str:
    """The doc with its generated blocks filled from the sweep's JSON."""
    return doc.fill(text, doc.blocks(data))


def sweep(quick: bool) -> dict[str, Any]:
    """Runs every configuration; returns the JSON-ready results with their summary."""
    import jax

    import _invariance_train as train

    batch_sizes = QUICK_BATCH_SIZES if quick else BATCH_SIZES
    epochs = QUICK_EPOCHS if quick else EPOCHS
    seeds = list(QUICK_SEEDS if quick else SEEDS)
    exponents = QUICK_EXPONENTS if quick else EXPONENTS
    ema_alphas = [10.0**e for e in exponents]
    decays = [1.0 - 10.0**e for e in exponents]
    data = train.load_data()
    load_start = os.getloadavg()
    start = time.perf_counter()
    runs = []
    configs = [train.Config(n, m) for n in batch_sizes for m in epochs]
    for i, config in enumerate(configs):
        out = train.run_config(
            config, seeds, ema_alphas, decays, BASE_LR, data, weight_decay=WEIGHT_DECAY
        )
        acc = out["correct"][:, -1, :].mean(axis=0) / len(data[3])
        print(
            f"[{i + 1}/{len(configs)}] batch {config.batch_size:>3}, {config.epochs:>2} epochs:"
            f" {out['wall_s']:5.1f} s; final raw {acc[0]:.4f}, best EMA {acc[1:].max():.4f}"
            f" (elapsed {time.perf_counter() - start:.0f} s)",
            flush=True,
        )
        runs.append(
            {
                "batch_size": config.batch_size,
                "epochs": config.epochs,
                "steps_per_epoch": out["steps_per_epoch"],
                "learning_rate": out["learning_rate"],
                "wall_s": round(out["wall_s"], 2),
                "names": out["names"],
                "half_life_fraction": out["half_life_fraction"],
                # Correct test predictions, (seed, epoch, column); column 0: raw weights.
                "correct": out["correct"].tolist(),
            }
        )
    meta = {
        "task": "scikit-learn digits, 8x8, fixed stratified 75/25 split",
        "model": "2 conv (16, 32 channels) + GroupNorm(4) + ReLU, global mean pool, dense 10",
        "quick": quick,
        "batch_sizes": list(batch_sizes),
        "epochs": list(epochs),
        "seeds": seeds,
        "ema_alphas": ema_alphas,
        "decays": decays,
        "averages_per_run": len(runs[0]["names"]),
        "update_period": train.UPDATE_PERIOD,
        "base_lr": BASE_LR,
        "reference_batch": train.REFERENCE_BATCH,
        "lr_scaling": "linear",
        "warmup_epochs": train.WARMUP_EPOCHS,
        "warmup_factor": train.WARMUP_FACTOR,
        "momentum": train.MOMENTUM,
        "weight_decay": WEIGHT_DECAY,
        "train_size": len(data[0]),
        "test_size": len(data[3]),
        "wall_s": round(time.perf_counter() - start, 1),
        "load_average_start": list(load_start),
        "load_average_end": list(os.getloadavg()),
        "machine": f"{os.cpu_count()} CPU cores ({platform.machine()})",
        "versions": {"jax": jax.__version__, "python": platform.python_version()},
    }
    result = {"meta": meta, "runs": runs}
    result["summary"] = report.analyze(result)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.write_doc or args.check_doc:
        text = DOC.read_text(encoding="utf-8")
        new = doc_text(load_results(), text)
        if args.check_doc:
            if new != text:
                print(f"{DOC} is out of date: run {__file__} --write-doc", file=sys.stderr)
                return 1
            return 0
        DOC.write_text(new, encoding="utf-8")
        return 0
    if args.summarize:
        result = load_results()
        result["summary"] = report.analyze(result)
        write_results(result, RESULTS)
        return 0
    out = (
        pathlib.Path(args.out)
        if args.out
        else (ROOT / "workdir" / "invariance-quick" if args.quick else RESULTS)
    )
    out.mkdir(parents=True, exist_ok=True)
    result = sweep(args.quick)
    write_results(result, out)
    print(doc.headline(result))
    return 0


def write_results(result: dict[str, Any], out: pathlib.Path) -> None:
    """The JSON (compact: most of it is the counts) and the plot."""
    json_path = out / "invariance.json"
    json_path.write_text(json.dumps(result, separators=(",", ":")) + "\n", encoding="utf-8")
    report.plot(result, str(out / "invariance.png"))
    print(f"wrote {json_path} and {out / 'invariance.png'} ({result['meta']['wall_s']} s)")


if __name__ == "__main__":
    sys.exit(main())

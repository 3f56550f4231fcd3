"""Does one EMA setting survive changes of batch size and schedule length? Every family.

Trains the digits CNN at every batch size and schedule length of a grid, several seeds
each, in two settings (``_invariance_train.SETTINGS``): pycls's own recipe (BatchNorm
with precise statistics for every average, cosine learning rate, pycls's warmup) and
the first sweep's (GroupNorm, constant learning rate). Every run tracks every family's
grid (``_invariance_families.FAMILIES``: pycls's rule linear and exact, a fixed decay,
EDM2's power function, EDM's half-life in samples, a half-life as a share of training,
BEMA) and records the final test accuracy and cross-entropy of every average and of
the raw weights. Then compares each family's one global setting against the best of
each configuration (``invariance_report.py``).

Run (not part of the test suite):
  python experiments/invariance.py                  # both settings (~50 min on 2 shared cores)
  python experiments/invariance.py --setting bn_cos # one setting (~25 min)
  python experiments/invariance.py --quick          # 2x2 configurations, one seed, coarse
                                                    # grids (~6 min on 2 shared cores)
  python experiments/invariance.py --write-doc      # docs/invariance.md from the JSON
  python experiments/invariance.py --check-doc      # exit 1 if the doc is out of date
  python experiments/invariance.py --summarize      # the JSONs' summaries and plots, again

Each setting writes ``experiments/results/invariance_<setting>.json`` (every number:
the correct counts and cross-entropies per seed and average, the settings, the summary)
and ``invariance_<setting>.png``; ``--quick`` writes into ``workdir/invariance-quick/``.
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
SETTINGS = ("bn_cos", "gn_const")  # _invariance_train.SETTINGS, without importing JAX

BATCH_SIZES = (8, 16, 32, 64)  # 8x
EPOCHS = (10, 20, 40)  # 4x
SEEDS = (0, 1, 2, 3, 4)

QUICK_BATCH_SIZES = (16, 64)
QUICK_EPOCHS = (3, 6)
QUICK_SEEDS = (0,)


def json_path(setting: str, folder: pathlib.Path = RESULTS) -> pathlib.Path:
    return folder / f"invariance_{setting}.json"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 batch sizes x 2 lengths, 1 seed")
    parser.add_argument("--setting", choices=SETTINGS, action="append", help="default: both")
    parser.add_argument("--out", default=None, help="output folder (JSON and plot)")
    parser.add_argument("--write-doc", action="store_true", help="only rewrite the doc")
    parser.add_argument("--check-doc", action="store_true", help="only check the doc")
    parser.add_argument(
        "--summarize",
        action="store_true",
        help="only recompute the JSONs' summaries and plots from their counts",
    )
    return parser.parse_args(argv)


def load_results(folder: pathlib.Path = RESULTS) -> dict[str, dict[str, Any]]:
    """Every setting's JSON, by setting."""
    return {s: json.loads(json_path(s, folder).read_text(encoding="utf-8")) for s in SETTINGS}


def doc_text(data: dict[str, dict[str, Any]], text: str) -> str:
    """The doc with its generated blocks filled from the sweeps' JSON."""
    return doc.fill(text, doc.blocks(data))


def sweep(setting_name: str, quick: bool) -> dict[str, Any]:
    """Runs every configuration of one setting; returns the JSON-ready results (no summary)."""
    import jax

    import _invariance_families as families
    import _invariance_train as train

    setting = train.SETTINGS[setting_name]
    norm = "BatchNorm" if setting.norm == "batch" else "GroupNorm(4)"
    batch_sizes = QUICK_BATCH_SIZES if quick else BATCH_SIZES
    epochs = QUICK_EPOCHS if quick else EPOCHS
    seeds = list(QUICK_SEEDS if quick else SEEDS)
    data = train.load_data()
    load_start = os.getloadavg()
    start = time.perf_counter()
    runs = []
    configs = [train.Config(n, m) for n in batch_sizes for m in epochs]
    for i, config in enumerate(configs):
        out = train.run_config(setting, config, seeds, data, quick)
        acc = out["correct"].mean(axis=0) / len(data[3])
        print(
            f"[{setting_name} {i + 1}/{len(configs)}] batch {config.batch_size:>3},"
            f" {config.epochs:>2} epochs: {out['wall_s']:5.1f} s; final raw {acc[0]:.4f},"
            f" best EMA {acc[1:].max():.4f} (elapsed {time.perf_counter() - start:.0f} s)",
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
                # After the last epoch, (seed, column); column 0: the raw weights.
                "correct": out["correct"].tolist(),  # correct test predictions
                "nll": [[round(v, 6) for v in row] for row in out["nll"].tolist()],
            }
        )
    meta = {
        "task": "scikit-learn digits, 8x8, fixed stratified 75/25 split",
        "setting": setting_name,
        "setting_title": setting.title,
        "model": f"2 conv (16, 32 channels) + {norm} + ReLU, global mean pool, dense 10",
        "norm": setting.norm,
        "precise_batch_stats": setting.norm == "batch",
        "lr_policy": setting.lr_policy,
        "nesterov": setting.nesterov,
        "quick": quick,
        "batch_sizes": list(batch_sizes),
        "epochs": list(epochs),
        "seeds": seeds,
        "families": [
            {
                "name": f.name,
                "label": f.label,
                "grid": list(families.grid(f, quick)),
                "log_scale": f.log_scale,
            }
            for f in families.FAMILIES
        ],
        "averages_per_run": len(runs[0]["names"]),
        "update_period": train.UPDATE_PERIOD,
        "base_lr": setting.base_lr,
        "reference_batch": train.REFERENCE_BATCH,
        "lr_scaling": "linear",
        "warmup_epochs": train.WARMUP_EPOCHS,
        "warmup_factor": train.WARMUP_FACTOR,
        "momentum": train.MOMENTUM,
        "weight_decay": train.WEIGHT_DECAY,
        "train_size": len(data[0]),
        "test_size": len(data[3]),
        "wall_s": round(time.perf_counter() - start, 1),
        "load_average_start": list(load_start),
        "load_average_end": list(os.getloadavg()),
        "machine": f"{os.cpu_count()} CPU cores ({platform.machine()})",
        "versions": {"jax": jax.__version__, "python": platform.python_version()},
    }
    return {"meta": meta, "runs": runs}


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
    settings = args.setting or list(SETTINGS)
    if args.summarize:
        for name in settings:
            result = json.loads(json_path(name).read_text(encoding="utf-8"))
            result["summary"] = report.analyze(result)
            write_results(result, RESULTS)
        return 0
    out = (
        pathlib.Path(args.out)
        if args.out
        else (ROOT / "workdir" / "invariance-quick" if args.quick else RESULTS)
    )
    out.mkdir(parents=True, exist_ok=True)
    for name in settings:
        result = sweep(name, args.quick)
        raw = json_path(name, out).with_suffix(".raw.json")  # kept until the summary is in
        raw.write_text(json.dumps(result, separators=(",", ":")) + "\n", encoding="utf-8")
        result["summary"] = report.analyze(result)
        write_results(result, out)
        raw.unlink()
        print(doc.headline_of(result))
    return 0


def write_results(result: dict[str, Any], out: pathlib.Path) -> None:
    """The JSON (compact: most of it is the counts) and the plot."""
    name = result["meta"]["setting"]
    path = json_path(name, out)
    path.write_text(json.dumps(result, separators=(",", ":")) + "\n", encoding="utf-8")
    report.plot(result, str(out / f"invariance_{name}.png"))
    print(f"wrote {path} and invariance_{name}.png ({result['meta']['wall_s']} s)")


if __name__ == "__main__":
    sys.exit(main())

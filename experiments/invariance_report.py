"""The invariance sweep's analysis and plot, from its JSON (``invariance_doc.py``: the doc).

NumPy only (and matplotlib for the plot): ``tests/test_invariance_doc.py`` imports it to
check, without training, that each JSON's summary is what its raw numbers give.

Definitions (``docs/invariance.md`` states them too):

- A *family* is a way to set the EMA once (``meta["families"]``: pycls's ``ema_alpha``,
  a fixed decay, EDM2's ``sigma_rel``, ...); a *setting* is one value of its knob.
- A *metric* is read after the last epoch: ``accuracy`` (test accuracy, %, higher is
  better) or ``nll`` (mean test cross-entropy, nats, lower is better). ``mean[c][s]``
  is its mean over seeds in configuration ``c`` at setting ``s``.
- The *best* setting of ``c`` is the one with the best ``mean[c][s]``; the *global*
  setting has the best average of ``mean[c][s]`` over configurations; the *loss* of
  ``c`` is how much worse the global setting is than the best, in the metric's units
  (points of accuracy, nats), never negative.
- The *share of the gain* is a loss over the mean gain of the best average of
  any family over the raw weights: the part of what an EMA can give that one setting
  gives up.
- The *held-out loss* is the same difference with both settings chosen on all seeds
  but one and measured on that one, averaged over the left-out seed: no selection bias
  (it can be negative).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

METRICS = ("accuracy", "nll")
UNITS = {"accuracy": "points", "nll": "nats"}


def family_columns(meta: Mapping[str, Any], names: list[str]) -> dict[str, list[int]]:
    """Each family's columns in a run's ``correct``/``nll`` (column 0 is the raw weights)."""
    index = {name: i + 1 for i, name in enumerate(names)}
    return {f["name"]: [index[f"{f['name']}:{v:.6g}"] for v in f["grid"]] for f in meta["families"]}


def per_seed(run: Mapping[str, Any], metric: str, test_size: int) -> np.ndarray:
    """The metric per seed and column, signed so that higher is better.

    Accuracy in %, and the negated cross-entropy (so every argmax picks the best).
    """
    if metric == "accuracy":
        return 100.0 * np.asarray(run["correct"], dtype=np.float64) / test_size
    return -np.asarray(run["nll"], dtype=np.float64)


def _held_out_losses(acc: np.ndarray) -> list[float] | None:
    """Leave-one-seed-out losses, one per left-out seed, each averaged over configurations.

    ``acc`` is (config, seed, setting). None with a single seed: nothing is left to choose on.
    """
    seeds = acc.shape[1]
    if seeds < 2:
        return None
    losses = []
    for held in range(seeds):
        rest = np.delete(acc, held, axis=1).mean(axis=1)  # (config, setting)
        best = rest.argmax(axis=1)
        glob = rest.mean(axis=0).argmax()
        out = acc[:, held, :]
        losses.append(float(np.mean(out[np.arange(len(out)), best] - out[:, glob])))
    return losses


def _by_axis(loss: np.ndarray, configs: list[dict[str, int]], meta: Mapping[str, Any]) -> Any:
    """Mean loss per batch size and per schedule length."""
    return {
        axis: [
            float(np.mean([v for v, c in zip(loss, configs, strict=True) if c[axis] == k]))
            for k in meta[key]
        ]
        for axis, key in (("batch_size", "batch_sizes"), ("epochs", "epochs"))
    }


def _family(
    acc: np.ndarray, grid: list[float], hl: list[list[float | None]], sign: float
) -> dict[str, Any]:
    """One family's summary; ``acc`` (config, seed, setting), higher is better."""
    mean, std = acc.mean(axis=1), acc.std(axis=1)
    best = mean.argmax(axis=1)
    glob = int(mean.mean(axis=0).argmax())
    rows = np.arange(len(acc))
    loss = mean[rows, best] - mean[:, glob]
    diff = acc[rows, :, best] - acc[:, :, glob]  # paired over seeds
    seeds = acc.shape[1]
    se = diff.std(axis=1, ddof=1) / math.sqrt(seeds) if seeds > 1 else diff[:, 0] * 0
    held = _held_out_losses(acc)
    last = len(grid) - 1
    return {
        "mean": (sign * mean).tolist(),
        "std": std.tolist(),
        "best_index": best.tolist(),
        "best_setting": [grid[i] for i in best],
        "best_mean": (sign * mean[rows, best]).tolist(),
        "best_at_edge": int(np.sum((best == 0) | (best == last))),
        "global_index": glob,
        "global_setting": grid[glob],
        "global_mean": (sign * mean[:, glob]).tolist(),
        "loss": loss.tolist(),
        "loss_se": se.tolist(),
        "loss_mean": float(loss.mean()),
        "loss_max": float(loss.max()),
        "loss_argmax": int(loss.argmax()),
        "held_out_loss": None if held is None else float(np.mean(held)),
        # Per left-out seed: their spread is the held-out loss's noise (paired across
        # families, which share the seeds).
        "held_out_losses": held,
        "best_half_life_fraction": [hl[c][best[c]] for c in rows],
        "global_half_life_fraction": [hl[c][glob] for c in rows],
    }


def analyze(data: Mapping[str, Any]) -> dict[str, Any]:
    """The summary of a sweep: per metric and family, best and global settings and losses."""
    meta, runs = data["meta"], data["runs"]
    test_size = meta["test_size"]
    configs = [{"batch_size": r["batch_size"], "epochs": r["epochs"]} for r in runs]
    summary: dict[str, Any] = {"configs": configs}
    for metric in METRICS:
        sign = 1.0 if metric == "accuracy" else -1.0
        values = [per_seed(r, metric, test_size) for r in runs]  # (seed, column) each
        out: dict[str, Any] = {
            "raw_mean": [sign * float(v[:, 0].mean()) for v in values],
            "raw_std": [float(v[:, 0].std()) for v in values],
        }
        best_any = np.full(len(runs), -np.inf)
        for f in meta["families"]:
            cols = [family_columns(meta, r["names"])[f["name"]] for r in runs]
            acc = np.stack([v[:, c] for v, c in zip(values, cols, strict=True)])
            hl = [
                [r["half_life_fraction"][r["names"][i - 1]] for i in c]
                for r, c in zip(runs, cols, strict=True)
            ]
            out[f["name"]] = family = _family(acc, f["grid"], hl, sign)
            family["by_axis"] = _by_axis(np.asarray(family["loss"]), configs, meta)
            best_any = np.maximum(best_any, sign * np.asarray(family["best_mean"]))
        raw = sign * np.asarray(out["raw_mean"])
        out["ema_gain"] = (best_any - raw).tolist()  # the best average of any family vs raw
        out["ema_gain_mean"] = float(np.mean(best_any - raw))
        out["ranking"] = sorted(
            (f["name"] for f in meta["families"]), key=lambda k: rank_loss(out[k])
        )
        summary[metric] = out
    summary["linear_vs_exact"] = _linear_vs_exact(summary, meta, runs)
    return summary


def rank_loss(family: Mapping[str, Any]) -> float:
    """A family's place: its held-out loss, or its mean loss with one seed."""
    held = family["held_out_loss"]
    return family["loss_mean"] if held is None else held


X_BINS = (0.0, 0.02, 0.1, 1.0, math.inf)  # x = ema_alpha*n*k/m; the linear error is about x/2


def _linear_vs_exact(
    summary: Mapping[str, Any], meta: Mapping[str, Any], runs: list[Any]
) -> list[dict[str, Any]]:
    """Exact minus linear mean final accuracy over (configuration, ema_alpha) pairs, by x."""
    lin, exa = summary["accuracy"]["linear"]["mean"], summary["accuracy"]["exact"]["mean"]
    grid = next(f["grid"] for f in meta["families"] if f["name"] == "linear")
    pairs = []  # (x, linear alpha / exact alpha - 1, exact - linear accuracy)
    for c, run in enumerate(runs):
        n, m, k = run["batch_size"], run["epochs"], meta["update_period"]
        for i, a in enumerate(grid):
            x = a * n * k / m
            exact = -math.expm1(n * k * math.log1p(-a / m))
            pairs.append((x, min(1.0, x) / exact - 1.0, exa[c][i] - lin[c][i]))
    out = []
    for lo, hi in itertools.pairwise(X_BINS):
        inside = [p for p in pairs if lo <= p[0] < hi]
        err = [p[1] for p in inside]
        diff = [p[2] for p in inside]
        out.append(
            {
                "x_from": lo,
                "x_to": hi if math.isfinite(hi) else None,
                "pairs": len(inside),
                "alpha_error_min": min(err) if inside else None,
                "alpha_error_max": max(err) if inside else None,
                "exact_minus_linear_mean": float(np.mean(diff)) if inside else None,
                "exact_minus_linear_min": min(diff) if inside else None,
                "exact_minus_linear_max": max(diff) if inside else None,
            }
        )
    return out


# -- the plot ----------------------------------------------------------------------------


def plot(data: Mapping[str, Any], path: str) -> None:
    """Each family's final test accuracy and cross-entropy vs its setting, per configuration.

    Each line is relative to its configuration's best setting of that family, so that
    where the optimum sits, and what a global setting (gray) costs, read off directly.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta = data["meta"]
    batches, lengths = meta["batch_sizes"], meta["epochs"]
    colors = plt.get_cmap("viridis")(np.linspace(0, 0.9, len(batches)))
    styles = ["-", "--", ":", "-."]
    families = meta["families"]
    cols = 4
    rows = math.ceil(len(families) / cols)
    fig, axes = plt.subplots(2 * rows, cols, figsize=(4.2 * cols, 3.3 * 2 * rows))
    for block, metric in enumerate(METRICS):
        s = data["summary"][metric]
        sign = 1.0 if metric == "accuracy" else -1.0
        flat = list(np.ravel(axes[block * rows : (block + 1) * rows]))
        for ax, family in zip(flat, families, strict=False):
            f = s[family["name"]]
            xs = np.asarray(family["grid"])
            for c, cfg in enumerate(data["summary"]["configs"]):
                color = colors[batches.index(cfg["batch_size"])]
                style = styles[lengths.index(cfg["epochs"]) % len(styles)]
                ys = sign * (np.asarray(f["mean"][c]) - f["best_mean"][c])
                ax.plot(xs, ys, style, color=color, marker=".", lw=1.2)
            ax.axvline(xs[f["global_index"]], color="gray", lw=0.8, alpha=0.6)
            if family.get("log_scale", True):
                ax.set_xscale("log")
            what = "accuracy" if metric == "accuracy" else "cross-entropy"
            ax.set(xlabel=family["label"], title=f"{family['name']}: {what}")
            low = 2.0 if metric == "accuracy" else max(0.01, 0.3 * s["ema_gain_mean"])
            ax.set_ylim(-low, 0.05 * low)
            ax.grid(alpha=0.3)
        for ax in flat[len(families) :]:
            ax.axis("off")
        unit = "points" if metric == "accuracy" else "-nats"
        for r in range(rows):
            flat[r * cols].set_ylabel(f"{unit} from the best")
    handles = [
        plt.Line2D([], [], color=colors[i], label=f"batch {n}") for i, n in enumerate(batches)
    ] + [
        plt.Line2D([], [], color="k", ls=styles[j % len(styles)], label=f"{m} epochs")
        for j, m in enumerate(lengths)
    ]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False)
    fig.suptitle(
        f"{meta['setting_title']}\nfinal test accuracy (top) and cross-entropy (bottom, negated),"
        " mean over seeds, relative to each configuration's best (gray: the global setting)"
    )
    fig.tight_layout(rect=(0, 0.03, 1, 0.98))
    fig.savefig(path, dpi=90)
    plt.close(fig)

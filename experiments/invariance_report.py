"""The invariance sweep's analysis and plot, from its JSON (``invariance_doc.py``: the doc).

NumPy only (and matplotlib for the plot): ``tests/test_invariance_doc.py`` imports it to
check, without training, that the JSON's summary is what its raw counts give.

Definitions (``docs/invariance.md`` states them too):

- A *family* is a way to set the EMA: ``linear`` (pycls's rule, one ``ema_alpha`` for
  every configuration), ``exact`` (the same with ``rule="exact"``), ``constant`` (a
  fixed per-step decay).
- For a metric (``final``: test accuracy after the last epoch; ``best``: the highest
  over the epochs), ``mean[c][s]`` is its mean over seeds in configuration ``c`` at
  setting ``s`` of the family.
- The *best* setting of ``c`` maximises ``mean[c][s]``; the *global* setting maximises
  the average of ``mean[c][s]`` over configurations; the *loss* of ``c`` is
  ``mean[c][best] - mean[c][global]``, in percentage points.
- The *held-out loss* is the same difference with both settings chosen on all seeds
  but one and measured on that one, averaged over the left-out seed: no selection bias.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

FAMILIES = ("linear", "exact", "constant")
METRICS = ("final", "best")
LABEL = {"linear": "ema_alpha (pycls)", "exact": "ema_alpha, exact", "constant": "decay"}


def family_columns(meta: Mapping[str, Any]) -> dict[str, tuple[list[float], slice]]:
    """Each family's grid and its columns in ``correct`` (column 0 is the raw weights)."""
    a, d = len(meta["ema_alphas"]), len(meta["decays"])
    return {
        "linear": (meta["ema_alphas"], slice(1, 1 + a)),
        "exact": (meta["ema_alphas"], slice(1 + a, 1 + 2 * a)),
        "constant": (meta["decays"], slice(1 + 2 * a, 1 + 2 * a + d)),
    }


def per_seed(run: Mapping[str, Any], metric: str, test_size: int) -> np.ndarray:
    """Accuracy (%) per seed and column: after the last epoch, or the best over epochs."""
    correct = np.asarray(run["correct"], dtype=np.float64)  # (seed, epoch, column)
    acc = 100.0 * correct / test_size
    return acc[:, -1, :] if metric == "final" else acc.max(axis=1)


def _held_out_loss(acc: np.ndarray) -> float | None:
    """Leave-one-seed-out loss, averaged over configurations; acc is (config, seed, setting).

    None with a single seed: nothing is left to choose on.
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
        losses.append(np.mean(out[np.arange(len(out)), best] - out[:, glob]))
    return float(np.mean(losses))


def analyze(data: Mapping[str, Any]) -> dict[str, Any]:
    """The summary of a sweep: per metric and family, best and global settings and losses."""
    meta, runs = data["meta"], data["runs"]
    test_size = meta["test_size"]
    columns = family_columns(meta)
    configs = [{"batch_size": r["batch_size"], "epochs": r["epochs"]} for r in runs]
    summary: dict[str, Any] = {"configs": configs}
    for metric in METRICS:
        accs = [per_seed(r, metric, test_size) for r in runs]  # (seed, column) each
        raw = [(float(a[:, 0].mean()), float(a[:, 0].std())) for a in accs]
        out: dict[str, Any] = {"raw_mean": [m for m, _ in raw], "raw_std": [s for _, s in raw]}
        for family, (grid, cols) in columns.items():
            acc = np.stack([a[:, cols] for a in accs])  # (config, seed, setting)
            mean, std = acc.mean(axis=1), acc.std(axis=1)
            best = mean.argmax(axis=1)
            glob = int(mean.mean(axis=0).argmax())
            rows = np.arange(len(runs))
            loss = mean[rows, best] - mean[:, glob]
            diff = acc[rows, :, best] - acc[:, :, glob]  # paired over seeds
            seeds = acc.shape[1]
            se = diff.std(axis=1, ddof=1) / math.sqrt(seeds) if seeds > 1 else diff[:, 0] * 0
            hl = [runs[c]["half_life_fraction"] for c in rows]
            names = [runs[c]["names"] for c in rows]
            first = cols.start - 1  # names exclude the raw column
            out[family] = {
                "mean": mean.tolist(),
                "std": std.tolist(),
                "best_index": best.tolist(),
                "best_setting": [grid[i] for i in best],
                "best_mean": mean[rows, best].tolist(),
                "best_std": std[rows, best].tolist(),
                "global_index": glob,
                "global_setting": grid[glob],
                "global_mean": mean[:, glob].tolist(),
                "loss": loss.tolist(),
                "loss_se": se.tolist(),
                "loss_mean": float(loss.mean()),
                "loss_max": float(loss.max()),
                "loss_argmax": int(loss.argmax()),
                "held_out_loss": _held_out_loss(acc),
                "best_half_life_fraction": [hl[c][names[c][first + best[c]]] for c in rows],
                "global_half_life_fraction": [hl[c][names[c][first + glob]] for c in rows],
            }
        summary[metric] = out
    x = [
        summary["final"]["linear"]["global_setting"]
        * r["batch_size"]
        * meta["update_period"]
        / r["epochs"]
        for r in runs
    ]
    summary["x_at_global_linear"] = x
    summary["by_axis"] = _by_axis(summary, meta)
    summary["linear_vs_exact"] = _linear_vs_exact(summary, meta, runs)
    return summary


def _by_axis(summary: Mapping[str, Any], meta: Mapping[str, Any]) -> dict[str, Any]:
    """Mean loss of each family's global setting per batch size and per schedule length."""
    configs = summary["configs"]
    out: dict[str, Any] = {}
    for metric in METRICS:
        out[metric] = {}
        for family in FAMILIES:
            loss = summary[metric][family]["loss"]
            out[metric][family] = {
                axis: [
                    float(np.mean([v for v, c in zip(loss, configs, strict=True) if c[axis] == k]))
                    for k in meta[key]
                ]
                for axis, key in (("batch_size", "batch_sizes"), ("epochs", "epochs"))
            }
    return out


X_BINS = (0.0, 0.02, 0.1, 1.0, math.inf)  # x = ema_alpha*n*k/m; the linear error is about x/2


def _linear_vs_exact(
    summary: Mapping[str, Any], meta: Mapping[str, Any], runs: list[Any]
) -> list[dict[str, Any]]:
    """Exact minus linear mean final accuracy over (configuration, ema_alpha) pairs, by x."""
    lin, exa = summary["final"]["linear"]["mean"], summary["final"]["exact"]["mean"]
    pairs = []  # (x, linear alpha / exact alpha - 1, exact - linear accuracy)
    for c, run in enumerate(runs):
        n, m, k = run["batch_size"], run["epochs"], meta["update_period"]
        for i, a in enumerate(meta["ema_alphas"]):
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
    """Test accuracy vs each family's setting, one line per configuration.

    Each line is relative to its configuration's best setting of that family, so that
    where the optimum sits, and what a global setting (gray) costs, read off directly.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s, meta = data["summary"], data["meta"]
    batches, lengths = meta["batch_sizes"], meta["epochs"]
    colors = plt.get_cmap("viridis")(np.linspace(0, 0.9, len(batches)))
    styles = ["-", "--", ":", "-."]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8), sharey=True)
    for row, metric in enumerate(METRICS):
        for ax, family in zip(axes[row], FAMILIES, strict=True):
            f = s[metric][family]
            grid = np.asarray(meta["decays"] if family == "constant" else meta["ema_alphas"])
            xs = 1.0 - grid if family == "constant" else grid
            for c, cfg in enumerate(s["configs"]):
                color = colors[batches.index(cfg["batch_size"])]
                style = styles[lengths.index(cfg["epochs"]) % len(styles)]
                ys = np.asarray(f["mean"][c]) - f["best_mean"][c]
                ax.plot(xs, ys, style, color=color, marker=".", lw=1.2)
            ax.axvline(xs[f["global_index"]], color="gray", lw=0.8, alpha=0.6)
            ax.set_xscale("log")
            xlabel = "1 - decay (per step)" if family == "constant" else LABEL[family]
            ax.set(xlabel=xlabel, title=f"{metric} test accuracy vs {LABEL[family]}")
            ax.set_ylim(-4, 0.3)
            ax.grid(alpha=0.3)
        axes[row][0].set_ylabel("points below the configuration's best")
    handles = [
        plt.Line2D([], [], color=colors[i], label=f"batch {n}") for i, n in enumerate(batches)
    ] + [
        plt.Line2D([], [], color="k", ls=styles[j % len(styles)], label=f"{m} epochs")
        for j, m in enumerate(lengths)
    ]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False)
    fig.suptitle(
        "Digits CNN: mean EMA test accuracy over seeds, relative to each configuration's"
        " best (gray: the global setting)"
    )
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)

"""The noisy quadratic model's sweep, analysed: one global setting per family against each best.

Same statistic as the digits sweep (invariance_report.py): for every family, the setting
that is best on average over all configurations (batch size x schedule length), and
what it loses against each configuration's own best setting of that family; here in
expected loss (exact, no seeds), as a ratio. Held out: the global setting chosen on
every configuration but one, judged on the one left out.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

Data = Mapping[str, Any]
HELPS = 0.01  # an EMA helps where its expected loss is at least 1% below the raw weights
LABEL = {
    "pycls": "pycls, linear",
    "pycls_exact": "pycls, exact",
    "constant": "constant decay",
    "halflife": "half-life in samples",
    "power_function": "power function (sigma_rel)",
    "fraction_of_training": "fraction of training",
}


def _matrix(configs: list[dict[str, Any]], family: str) -> np.ndarray:
    return np.array([c["losses"][family] for c in configs])


def _family(configs: list[dict[str, Any]], family: str, grid: list[float]) -> dict[str, Any]:
    loss = _matrix(configs, family)
    best = loss.min(axis=1)
    log_ratio = np.log(loss / best[:, None])
    g = int(np.argmin(log_ratio.mean(axis=0)))
    excess = loss[:, g] / best - 1.0
    held = []
    for k in range(len(configs)):
        others = np.delete(log_ratio, k, axis=0).mean(axis=0)
        held.append(float(loss[k, int(np.argmin(others))] / best[k] - 1.0))
    worst = int(np.argmax(excess))
    return {
        "global": grid[g],
        "global_at_edge": g in (0, len(grid) - 1),
        "mean_excess": float(excess.mean()),
        "worst_excess": float(excess[worst]),
        "worst_config": [configs[worst]["batch_size"], configs[worst]["epochs"]],
        "held_out_excess": float(np.mean(held)),
        "excess": excess.tolist(),
        "best_setting": [grid[int(j)] for j in loss.argmin(axis=1)],
        "best_at_edge": bool(np.any(np.isin(loss.argmin(axis=1), [0, len(grid) - 1]))),
        "best_loss": best.tolist(),
    }


def _optimal_half_life(configs: list[dict[str, Any]], grid: list[float], dataset: int) -> list:
    """The loss-optimal constant decay's half-life, per configuration: steps, samples, share."""
    rows = []
    for c in configs:
        one_minus_decay = grid[int(np.argmin(c["losses"]["constant"]))]
        # a step size of 1 keeps no history: the raw weights are the best "average"
        steps = 0.0 if one_minus_decay >= 1.0 else math.log(2.0) / -math.log1p(-one_minus_decay)
        total = c["epochs"] * (dataset // c["batch_size"])
        rows.append(
            {
                "batch_size": c["batch_size"],
                "epochs": c["epochs"],
                "steps": steps,
                "samples": steps * c["batch_size"],
                "fraction": steps / total,
            }
        )
    return rows


def analyze(data: Data) -> dict[str, Any]:
    """Per policy: each family's global setting and losses, the optimal half-lives, a ranking."""
    settings = data["settings"]
    out: dict[str, Any] = {}
    for name, configs in data["results"].items():
        families = {f: _family(configs, f, settings["grids"][f]) for f in settings["grids"]}
        overall = np.min([np.array(v["best_loss"]) for v in families.values()], axis=0)
        for v in families.values():
            v["tuned_vs_overall"] = float(np.mean(np.array(v["best_loss"]) / overall - 1.0))
        ranking = sorted(families, key=lambda f: families[f]["held_out_excess"])
        out[name] = {
            "families": families,
            "ranking": ranking,
            "optimal_half_life": _optimal_half_life(
                configs, settings["grids"]["constant"], settings["dataset"]
            ),
            "raw": [c["raw"] for c in configs],
            "gain": (1.0 - overall / np.array([c["raw"] for c in configs])).tolist(),
        }
    return out


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _setting(x: float) -> str:
    return f"{x:.3g}"


def family_table(data: Data, policy: str) -> str:
    s = data["summary"][policy]
    lines = [
        "| family | its parameter | global setting | mean loss over best | worst (batch, epochs) |"
        " held out | tuned per config, over the best family |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for f in s["ranking"]:
        v = s["families"][f]
        edge = " (grid edge)" if v["global_at_edge"] else ""
        b, m = v["worst_config"]
        lines.append(
            f"| {LABEL[f]} | `{data['settings']['parameter'][f]}` | {_setting(v['global'])}{edge}"
            f" | +{_pct(v['mean_excess'])} | +{_pct(v['worst_excess'])} ({b}, {m})"
            f" | +{_pct(v['held_out_excess'])} | +{_pct(v['tuned_vs_overall'])} |"
        )
    return "\n".join(lines)


def half_life_table(data: Data, policy: str) -> str:
    rows = data["summary"][policy]["optimal_half_life"]
    lines = [
        "| batch | epochs | half-life, steps | samples | share of training | best EMA vs raw |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    gains = data["summary"][policy]["gain"]
    for r, gain in zip(rows, gains, strict=True):
        lines.append(
            f"| {r['batch_size']} | {r['epochs']} | {r['steps']:.1f} | {r['samples']:,.0f}"
            f" | {_pct(r['fraction'])} | {-100 * gain:+.1f}% |"
        )
    return "\n".join(lines)


def by_batch(data: Data, policy: str, family: str) -> dict[int, float]:
    """The family's mean excess over each batch size's configurations."""
    configs = data["results"][policy]
    excess = data["summary"][policy]["families"][family]["excess"]
    out: dict[int, list[float]] = {}
    for c, e in zip(configs, excess, strict=True):
        out.setdefault(c["batch_size"], []).append(e)
    return {b: float(np.mean(v)) for b, v in out.items()}


def headline(data: Data) -> str:
    """One line per setting: the most and least invariant family, and the best shape."""
    lines = ["**In the noisy quadratic model (expected final loss, held out):**", ""]
    for name, s in data["summary"].items():
        if max(s["gain"]) < HELPS:
            lines.append(
                f"- {name}: no EMA of any family beats the raw weights by {_pct(HELPS)}"
                " in any configuration (the learning rate's decay already averages)"
            )
            continue
        first, last = s["ranking"][0], s["ranking"][-1]
        shape = min(s["families"], key=lambda f: s["families"][f]["tuned_vs_overall"])
        lines.append(
            f"- {name}: the most invariant family is {LABEL[first]}"
            f" (+{_pct(s['families'][first]['held_out_excess'])} over each configuration's"
            f" best), the least {LABEL[last]} (+{_pct(s['families'][last]['held_out_excess'])});"
            f" tuned per configuration, the best shape is {LABEL[shape]}'s"
        )
    return "\n".join(lines)


def bend(data: Data) -> str:
    """Where pycls's rule loses most, per batch size, for each policy."""
    batches = data["settings"]["batch_sizes"]
    lines = ["| setting | " + " | ".join(f"batch {b}" for b in batches) + " |"]
    lines.append("|---|" + "---:|" * len(data["settings"]["batch_sizes"]))
    for policy in data["summary"]:
        mean = by_batch(data, policy, "pycls")
        lines.append(
            f"| {policy} | "
            + " | ".join(f"+{_pct(mean[b])}" for b in data["settings"]["batch_sizes"])
            + " |"
        )
    return "\n".join(lines)


def setup(data: Data) -> str:
    st = data["settings"]
    return "\n".join(
        [
            f"- modes: {' or '.join(map(str, st['dims']))}, curvature h_i = 1/i, per-sample"
            " gradient noise variance c_i = h_i, start theta_i = 1",
            f"- an epoch is {st['dataset']} samples; batch sizes"
            f" {', '.join(map(str, st['batch_sizes']))};"
            f" epochs {', '.join(map(str, st['epochs']))}",
            f"- SGD without momentum, learning rate {st['base_lr']} x batch /"
            f" {st['reference_batch']}"
            " (the digits sweep's), constant or pycls's per-epoch cosine to 0",
            f"- {len(next(iter(st['grids'].values())))} log-spaced settings per family;"
            " update_period 1, no EMA warmup; 0.0% means the same grid point was best in every"
            " configuration",
            f"- computed exactly (no sampling) in {data['wall_s']} s ({data['machine']})",
        ]
    )


def slug(name: str) -> str:
    """A setting's block-name part: "constant lr, 20 modes" -> "constant_20"."""
    policy, dim = re.fullmatch(r"(\w+) lr, (\d+) modes", name).groups()  # type: ignore[union-attr]
    return f"{policy}_{dim}"


def blocks(data: Data) -> dict[str, str]:
    out = {"headline": headline(data), "setup": setup(data), "bend": bend(data)}
    for name in data["summary"]:
        out[f"families_{slug(name)}"] = family_table(data, name)
        out[f"half_life_{slug(name)}"] = half_life_table(data, name)
    return out


def text_summary(data: Data) -> str:
    return "\n\n".join(
        [headline(data)]
        + [f"{p}:\n{family_table(data, p)}\n\n{half_life_table(data, p)}" for p in data["summary"]]
        + [bend(data)]
    )

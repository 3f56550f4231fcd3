"""docs/invariance.md's generated blocks, written from the sweeps' JSON summaries.

``python experiments/invariance.py --write-doc`` fills the doc between
``<!-- BEGIN GENERATED: name -->`` and ``<!-- END GENERATED: name -->``;
``tests/test_invariance_doc.py`` checks that the doc holds them verbatim. ``data`` is
``{setting: that setting's JSON}`` (``invariance.load_results``); the theory's
comparison reads ``experiments/results/nqm.json``.
"""

from __future__ import annotations

import json
import math
import pathlib
import re
import statistics
from collections.abc import Mapping
from typing import Any

from invariance_report import rank_loss

Data = Mapping[str, Any]
ROOT = pathlib.Path(__file__).resolve().parents[1]
NQM_JSON = ROOT / "experiments" / "results" / "nqm.json"
# The NQM's policy keys that match each setting's learning rate (20 modes: noise at the end).
NQM_POLICY = {"bn_cos": "cos lr, 20 modes", "gn_const": "constant lr, 20 modes"}
NQM_NAME = {"linear": "pycls", "exact": "pycls_exact"}  # the NQM's names where they differ
SHORT = {"bn_cos": "BatchNorm, cosine", "gn_const": "GroupNorm, constant"}


def _pct(v: float | None, digits: int = 2) -> str:
    """A loss to ``digits`` decimals; one that rounds to zero is 0.00, not -0.00."""
    if v is None:
        return "n/a"
    text = f"{v:.{digits}f}"
    return text.replace("-", "") if float(text) == 0 else text


def _setting(v: float) -> str:
    return f"{v:.3g}"


def _where(s: Data, c: int) -> str:
    cfg = s["configs"][c]
    return f"batch {cfg['batch_size']}, {cfg['epochs']} epochs"


def _families(data: Data) -> list[dict[str, Any]]:
    return data["meta"]["families"]


def _unit(metric: str) -> str:
    return "millinats" if metric == "nll" else "points"


def _se(f: Data) -> float | None:
    """The held-out loss's standard error over the left-out seeds."""
    losses = f["held_out_losses"]
    if not losses or len(losses) < 2:
        return None
    return float(statistics.stdev(losses) / math.sqrt(len(losses)))


def _paired(first: Data, last: Data) -> tuple[float, float] | None:
    """Held-out loss of ``last`` minus ``first``, and its standard error, paired by seed."""
    if not first["held_out_losses"] or len(first["held_out_losses"]) < 2:
        return None
    diff = [b - a for a, b in zip(first["held_out_losses"], last["held_out_losses"], strict=True)]
    return statistics.fmean(diff), statistics.stdev(diff) / math.sqrt(len(diff))


def _held(f: Data, metric: str) -> str:
    """The held-out loss ± its standard error, in the metric's display unit."""
    se = _se(f)
    value = _loss(rank_loss(f), metric)
    return value if se is None else f"{value} ± {_loss(se, metric)}"


def _ranking_sentence(m: Data, metric: str) -> str:
    """First and last family by held-out loss, and whether their gap is beyond the noise."""
    order = m["ranking"]
    first, last = m[order[0]], m[order[-1]]
    what = "test cross-entropy" if metric == "nll" else "final test accuracy"
    text = (
        f"by {what}, **{order[0]}** ({_held(first, metric)} {_unit(metric)}) and the least"
        f" {order[-1]} ({_held(last, metric)})"
    )
    paired = _paired(first, last)
    if paired is not None:
        diff, se = paired
        beyond = "beyond" if diff > 2 * se else "within"
        text += (
            f": {_loss(diff, metric)} ± {_loss(se, metric)} apart, paired over the left-out"
            f" seeds, {beyond} two standard errors"
        )
    return text


def headline(data: Mapping[str, Data]) -> str:
    """The answer per setting: the most and least invariant family by each metric."""
    lines = [
        "**The most invariant family, held out (its one setting's loss against each"
        " configuration's best, ± its standard error over seeds):**",
        "",
    ]
    for d in data.values():
        a, n = d["summary"]["accuracy"], d["summary"]["nll"]
        lines.append(
            f"- {d['meta']['setting_title']}: {_ranking_sentence(n, 'nll')};"
            f" {_ranking_sentence(a, 'accuracy')}. The best average of any family beat the"
            f" raw weights by {_pct(a['ema_gain_mean'])} points and"
            f" {_loss(n['ema_gain_mean'], 'nll')} millinats on average."
        )
    return "\n".join(lines)


def _share(metric: Data, family: str) -> str:
    """A family's held-out (or mean) loss as a share of the best EMA's mean gain over raw."""
    gain = metric["ema_gain_mean"]
    return f"{rank_loss(metric[family]) / gain:.1%}" if gain > 0 else "n/a"


def verdict(data: Mapping[str, Data]) -> str:
    """Every family in both settings: held-out cross-entropy and accuracy losses."""
    names = list(data)
    head = "| family | knob |" + "".join(
        f" {SHORT[n]}: cross-entropy held out (millinats) | its share of the gain"
        " | minus the most invariant's, paired | accuracy held out (points) | mean | worst |"
        for n in names
    )
    lines = [head, "|---|---|" + "---:|---:|---:|---:|---:|---:|" * len(names)]
    for f in _families(data[names[0]]):
        cells = []
        for n in names:
            s = data[n]["summary"]["accuracy"][f["name"]]
            x = data[n]["summary"]["nll"][f["name"]]
            nll = data[n]["summary"]["nll"]
            share = _share(nll, f["name"])
            paired = _paired(nll[nll["ranking"][0]], x)
            gap = "n/a" if paired is None else " ± ".join(_loss(v, "nll") for v in paired)
            cells.append(
                f" {_held(x, 'nll')} | {share} | {gap} | {_held(s, 'accuracy')} |"
                f" {_pct(s['loss_mean'])} | {_pct(s['loss_max'])} |"
            )
        lines.append(f"| {f['name']} | {f['label']} |" + "".join(cells))
    return "\n".join(lines)


def theory(data: Mapping[str, Data], nqm: Data) -> str:
    """Each family's rank in the digits sweeps next to the noisy quadratic model's."""
    names = list(data)
    head = "| family |" + "".join(
        f" {SHORT[n]}: digits rank, accuracy | cross-entropy | NQM ({NQM_POLICY[n]}) rank"
        " | NQM held-out excess loss |"
        for n in names
    )
    lines = [head, "|---|" + "---:|---:|---:|---:|" * len(names)]
    for f in _families(data[names[0]]):
        cells = []
        for n in names:
            s = data[n]["summary"]
            by_acc = s["accuracy"]["ranking"].index(f["name"]) + 1
            by_nll = s["nll"]["ranking"].index(f["name"]) + 1
            summary = nqm["summary"][NQM_POLICY[n]]
            key = NQM_NAME.get(f["name"], f["name"])
            if key in summary["ranking"]:
                rank = str(summary["ranking"].index(key) + 1)
                held = f"+{summary['families'][key]['held_out_excess']:.1%}"
            else:
                rank, held = "not modelled", ""
            cells.append(f" {by_acc} | {by_nll} | {rank} | {held} |")
        lines.append(f"| {f['name']} |" + "".join(cells))
    return "\n".join(lines)


def setup(d: Data) -> str:
    meta = d["meta"]

    def join(xs: Any) -> str:
        return ", ".join(str(x) for x in xs)

    lr = (
        "pycls's per-epoch cosine (`lr_fun_cos`, down to 0), its first epoch at"
        f" {meta['warmup_factor']:g}x (`WARMUP_FACTOR`, `WARMUP_EPOCHS` 1)"
        if meta["lr_policy"] == "cos"
        else f"a linear warmup over {meta['warmup_epochs']} epoch from"
        f" {meta['warmup_factor']:g}x, then constant"
    )
    norm = (
        "the raw weights and every average are evaluated with pycls's precise statistics"
        " (`ema_jax.precise_batch_stats` over the whole training set in batches of the"
        " run's size)"
        if meta["precise_batch_stats"]
        else "GroupNorm holds no statistics: every average is evaluated as it is"
    )
    grids = "; ".join(
        f"{f['name']} ({len(f['grid'])}): {_setting(f['grid'][0])} to {_setting(f['grid'][-1])}"
        for f in meta["families"]
    )
    return "\n".join(
        [
            f"- task: {meta['task']}; {meta['train_size']} training and {meta['test_size']}"
            f" test images (one test image is {100 / meta['test_size']:.2f} points)",
            f"- model: {meta['model']}; {norm}",
            f"- batch sizes: {join(meta['batch_sizes'])}; schedule lengths (epochs):"
            f" {join(meta['epochs'])}; seeds: {join(meta['seeds'])}",
            f"- learning rate {meta['base_lr']:g} x batch / {meta['reference_batch']}"
            f" ({meta['lr_scaling']} scaling): {lr}; SGD with momentum {meta['momentum']:g}"
            f"{' (Nesterov)' if meta['nesterov'] else ''}, weight decay {meta['weight_decay']:g}",
            f"- grids ({meta['averages_per_run']} averages per run, every step"
            f" (`update_period` {meta['update_period']})): {grids}",
            f"- wall time {meta['wall_s'] / 60:.1f} min on {meta['machine']}, shared (load"
            f" average {meta['load_average_start'][0]:.1f} at the start,"
            f" {meta['load_average_end'][0]:.1f} at the end); jax {meta['versions']['jax']}",
        ]
    )


def family_table(d: Data) -> str:
    """Per family and metric: the global setting, the losses (mean, worst, held out), edges."""
    s = d["summary"]
    lines = [
        "| family | metric | global setting | mean loss | worst loss | where | held out"
        " | best at the grid's edge |",
        "|---|---|---:|---:|---:|---|---:|---:|",
    ]
    for f in _families(d):
        for metric in ("nll", "accuracy"):
            m = s[metric][f["name"]]
            lines.append(
                f"| {f['name']} | {_unit(metric)} | {_setting(m['global_setting'])}"
                f" | {_loss(m['loss_mean'], metric)} | {_loss(m['loss_max'], metric)}"
                f" | {_where(s, m['loss_argmax'])} | {_held(m, metric)}"
                f" | {m['best_at_edge']} of {len(s['configs'])} |"
            )
    return "\n".join(lines)


def _loss(v: float | None, metric: str) -> str:
    """Accuracy losses in points; cross-entropy losses in millinats (1e-3 nats)."""
    return _pct(None if v is None else 1000.0 * v, 2) if metric == "nll" else _pct(v, 2)


def axis_table(d: Data, metric: str) -> str:
    """Mean loss of each family's global setting per batch size and per schedule length."""
    s, meta = d["summary"][metric], d["meta"]
    families = [f["name"] for f in _families(d)]
    lines = ["| | " + " | ".join(families) + " |", "|---|" + "---:|" * len(families)]
    for axis, key in (("batch_size", "batch_sizes"), ("epochs", "epochs")):
        for i, v in enumerate(meta[key]):
            label = f"batch {v}" if axis == "batch_size" else f"{v} epochs"
            losses = [s[f]["by_axis"][axis][i] for f in families]
            lines.append(f"| {label} | " + " | ".join(_loss(x, metric) for x in losses) + " |")
    return "\n".join(lines)


def config_table(d: Data) -> str:
    """Per configuration: the raw weights, the best average's gain, each family's best half-life.

    The best settings by cross-entropy (they move less with the noise than accuracy's).
    """
    a, n = d["summary"]["accuracy"], d["summary"]["nll"]
    families = [f["name"] for f in _families(d)]
    lines = [
        "| batch | epochs | raw accuracy | best average: gain | raw cross-entropy (nats)"
        " | gain (millinats) | " + " | ".join(families) + " |",
        "|---:|---:|---:|---:|---:|---:|" + "---:|" * len(families),
    ]
    for c, cfg in enumerate(d["summary"]["configs"]):
        cells = []
        for f in families:
            h = n[f]["best_half_life_fraction"][c]
            cells.append("n/a" if h is None else f"{h:.1%}")
        lines.append(
            f"| {cfg['batch_size']} | {cfg['epochs']}"
            f" | {_pct(a['raw_mean'][c])} ± {_pct(a['raw_std'][c])} | +{_pct(a['ema_gain'][c])}"
            f" | {n['raw_mean'][c]:.4f} | {_loss(n['ema_gain'][c], 'nll')} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines)


def exact_table(d: Data) -> str:
    """Linear vs exact rule by x, over every (configuration, ema_alpha) pair."""
    lines = [
        "| x = `ema_alpha*n*k/m` | pairs | linear alpha above exact | exact minus linear"
        " accuracy, mean | min | max |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for b in d["summary"]["linear_vs_exact"]:
        span = (
            f"{b['x_from']:g} to {b['x_to']:g}" if b["x_to"] is not None else f">= {b['x_from']:g}"
        )
        if not b["pairs"]:
            lines.append(f"| {span} | 0 | | | | |")
            continue
        lines.append(
            f"| {span} | {b['pairs']}"
            f" | {b['alpha_error_min']:.1%} to {b['alpha_error_max']:.1%}"
            f" | {_pct(b['exact_minus_linear_mean'])} | {_pct(b['exact_minus_linear_min'])}"
            f" | {_pct(b['exact_minus_linear_max'])} |"
        )
    return "\n".join(lines)


def findings(d: Data) -> str:
    """Where each family breaks, by cross-entropy: its best settings' spread, its worst axes."""
    s, meta = d["summary"]["nll"], d["meta"]
    lines = []
    for f in _families(d):
        fam = s[f["name"]]
        by = fam["by_axis"]
        b = max(range(len(meta["batch_sizes"])), key=by["batch_size"].__getitem__)
        e = max(range(len(meta["epochs"])), key=by["epochs"].__getitem__)
        best = [_setting(v) for v in fam["best_setting"]]
        lines.append(
            f"- **{f['name']}**: best settings {min(fam['best_setting']):.3g} to"
            f" {max(fam['best_setting']):.3g} over the configurations (global"
            f" {_setting(fam['global_setting'])}, {len(set(best))} distinct values); its global"
            f" setting lost most at batch {meta['batch_sizes'][b]}"
            f" ({_loss(by['batch_size'][b], 'nll')} millinats on average there) and at"
            f" {meta['epochs'][e]} epochs ({_loss(by['epochs'][e], 'nll')})."
        )
    return "\n".join(lines)


def blocks(data: Mapping[str, Data], nqm: Data | None = None) -> dict[str, str]:
    """The generated blocks of ``docs/invariance.md``, by name."""
    if nqm is None:
        nqm = json.loads(NQM_JSON.read_text(encoding="utf-8"))
    out = {"headline": headline(data), "verdict": verdict(data), "theory": theory(data, nqm)}
    for name, d in data.items():
        out[f"setup_{name}"] = setup(d)
        out[f"families_{name}"] = family_table(d)
        out[f"by_axis_{name}"] = axis_table(d, "accuracy")
        out[f"by_axis_nll_{name}"] = axis_table(d, "nll")
        out[f"configs_{name}"] = config_table(d)
        out[f"findings_{name}"] = findings(d)
        out[f"exact_{name}"] = exact_table(d)
    return out


def headline_of(d: Data) -> str:
    """One setting's result in a line (printed after a sweep)."""
    return headline({d["meta"]["setting"]: d})


BLOCK = re.compile(r"(<!-- BEGIN GENERATED: (\S+) -->\n).*?(\n<!-- END GENERATED: \2 -->)", re.S)


def fill(doc: str, generated: Mapping[str, str]) -> str:
    """``doc`` with every generated block replaced; each block must be there."""
    found = {name for _, name, _ in BLOCK.findall(doc)}
    missing = sorted(set(generated) - found)
    if missing:
        raise ValueError(f"the doc lacks the block(s) {missing}: add their BEGIN/END markers")
    return BLOCK.sub(lambda m: m[1] + generated[m[2]] + m[3], doc)

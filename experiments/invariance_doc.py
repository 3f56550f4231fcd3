"""docs/invariance.md's generated blocks, written from the sweep's JSON summary.

``python experiments/invariance.py --write-doc`` fills the doc between
``<!-- BEGIN GENERATED: name -->`` and ``<!-- END GENERATED: name -->``;
``tests/test_invariance_doc.py`` checks that the doc holds them verbatim.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from invariance_report import FAMILIES
from invariance_report import LABEL
from invariance_report import METRICS

Data = Mapping[str, Any]


def _pct(v: float | None) -> str:
    """Percentage points to two decimals; a mean that rounds to zero is 0.00, not -0.00."""
    if v is None:
        return "n/a"
    text = f"{v:.2f}"
    return "0.00" if text == "-0.00" else text


def _setting(family: str, v: float) -> str:
    return f"{v:.5g}" if family == "constant" else f"{v:.3g}"


def _where(s: Data, c: int) -> str:
    cfg = s["configs"][c]
    return f"batch {cfg['batch_size']}, {cfg['epochs']} epochs"


def holds(data: Data) -> bool:
    """The verdict: one global ``ema_alpha`` lost less than one global decay, on every count.

    On average, at worst and, with more than one seed, on held-out seeds (final accuracy).
    """
    lin, con = data["summary"]["final"]["linear"], data["summary"]["final"]["constant"]
    ok = lin["loss_mean"] < con["loss_mean"] and lin["loss_max"] < con["loss_max"]
    if lin["held_out_loss"] is not None:
        ok = ok and lin["held_out_loss"] < con["held_out_loss"]
    return ok


def headline(data: Data) -> str:
    """The result in one sentence (final test accuracy)."""
    s, meta = data["summary"], data["meta"]
    lin, con = s["final"]["linear"], s["final"]["constant"]
    n, m = meta["batch_sizes"], meta["epochs"]
    verdict = "the claim held" if holds(data) else "the claim did not hold"
    return (
        f"**On the digits CNN {verdict}:** across {len(s['configs'])} configurations (batch"
        f" {min(n)} to {max(n)}, {min(m)} to {max(m)} epochs, {_seeds(len(meta['seeds']))}),"
        f" one `ema_alpha` ({_setting('linear', lin['global_setting'])}) lost"
        f" {_pct(lin['loss_mean'])} points of final test accuracy on average against each"
        f" configuration's best `ema_alpha` and at most {_pct(lin['loss_max'])} (at"
        f" {_where(s, lin['loss_argmax'])}), while one fixed per-step decay"
        f" ({_setting('constant', con['global_setting'])}) lost {_pct(con['loss_mean'])} on"
        f" average and up to {_pct(con['loss_max'])} (at {_where(s, con['loss_argmax'])})."
    )


def _seeds(count: int) -> str:
    return "one seed" if count == 1 else f"{count} seeds each"


def _spread(values: list[float]) -> tuple[float, float, float]:
    lo, hi = min(values), max(values)
    return lo, hi, hi / lo


def findings(data: Data) -> str:
    """What the tables say, as bullets computed from them."""
    s = data["summary"]
    lin, exa, con = (s["final"][f] for f in FAMILIES)
    a_lo, a_hi, a_ratio = _spread(lin["best_setting"])
    d_lo, d_hi, d_ratio = _spread([1.0 - d for d in con["best_setting"]])
    h_lin = _spread(lin["best_half_life_fraction"])
    h_con = _spread(con["best_half_life_fraction"])
    g_con = _spread(con["global_half_life_fraction"])
    worst = lin["loss_argmax"]
    raw_std = s["final"]["raw_std"]
    widest = max(range(len(raw_std)), key=raw_std.__getitem__)
    x_max = max(s["x_at_global_linear"])
    best = s["best"]
    return "\n".join(
        [
            f"- The best `ema_alpha` moved by a factor of {a_ratio:.3g} over the configurations"
            f" ({_setting('linear', a_lo)} to {_setting('linear', a_hi)}); the best decay's"
            f" `1 - decay` by a factor of {d_ratio:.3g} ({d_lo:.3g} to {d_hi:.3g}).",
            f"- At the best settings the half-life was {h_lin[0]:.1%} to {h_lin[1]:.1%} of"
            f" training under pycls's rule and {h_con[0]:.1%} to {h_con[1]:.1%} with a fixed"
            f" decay; the one global decay's half-life ranged over {g_con[0]:.1%} to"
            f" {g_con[1]:.1%} of training.",
            f"- Tuned per configuration on all seeds but one and tested on the left-out seed,"
            f" the per-configuration best beat the global setting by"
            f" {_pct(lin['held_out_loss'])} points for `ema_alpha` and"
            f" {_pct(con['held_out_loss'])} for the decay (negative: the global setting did"
            " better).",
            f"- One `ema_alpha` lost most at {_where(s, worst)}, where the best `ema_alpha` was"
            f" {_setting('linear', lin['best_setting'][worst])} (half-life"
            f" {lin['best_half_life_fraction'][worst]:.1%} of training); the raw weights'"
            f" final accuracy spread over seeds (standard deviation) was widest at"
            f" {_where(s, widest)}, {_pct(raw_std[widest])} points.",
            f"- At the global `ema_alpha`, `x = ema_alpha*n*k/m` was at most {x_max:.3g}, and"
            f" the exact rule's loss was {_pct(exa['loss_mean'])} on average and at most"
            f" {_pct(exa['loss_max'])}, against the linear rule's {_pct(lin['loss_mean'])} and"
            f" {_pct(lin['loss_max'])}.",
            f"- Best accuracy over epochs instead of final: one `ema_alpha`"
            f" ({_setting('linear', best['linear']['global_setting'])}) lost"
            f" {_pct(best['linear']['loss_mean'])} on average and at most"
            f" {_pct(best['linear']['loss_max'])}; one decay"
            f" ({_setting('constant', best['constant']['global_setting'])})"
            f" {_pct(best['constant']['loss_mean'])} and {_pct(best['constant']['loss_max'])}.",
        ]
    )


def setup(data: Data) -> str:
    meta = data["meta"]

    def join(xs: Any) -> str:
        return ", ".join(str(x) for x in xs)

    return "\n".join(
        [
            f"- task: {meta['task']}; {meta['train_size']} training and {meta['test_size']}"
            f" test images (one test image is {100 / meta['test_size']:.2f} points)",
            f"- model: {meta['model']}",
            f"- batch sizes: {join(meta['batch_sizes'])}; schedule lengths (epochs):"
            f" {join(meta['epochs'])}; seeds: {join(meta['seeds'])}",
            f"- learning rate {meta['base_lr']:g} x batch / {meta['reference_batch']}"
            f" ({meta['lr_scaling']} scaling), {meta['warmup_epochs']} warmup epoch from"
            f" {meta['warmup_factor']:g}x of it, then constant; SGD with momentum"
            f" {meta['momentum']:g}, weight decay {meta['weight_decay']:g}",
            f"- `ema_alpha` ({len(meta['ema_alphas'])} values, each with `rule='linear'` and"
            f" `rule='exact'`): {join(f'{a:.3g}' for a in meta['ema_alphas'])}",
            f"- decay ({len(meta['decays'])} values, `schedules.constant`, per step):"
            f" {join(f'{d:.5g}' for d in meta['decays'])}",
            f"- `update_period` {meta['update_period']}; steps per epoch: training images //"
            f" batch; {meta['averages_per_run']} averages per run in one `ema_jax.ema`",
            f"- sweep wall time {meta['wall_s'] / 60:.1f} min on {meta['machine']}, shared"
            f" (load average {meta['load_average_start'][0]:.1f} at the start,"
            f" {meta['load_average_end'][0]:.1f} at the end); jax {meta['versions']['jax']}",
        ]
    )


def loss_table(data: Data) -> str:
    s = data["summary"]
    lines = [
        "| metric | family | global setting | mean loss | max loss | where | held-out loss |",
        "|---|---|---:|---:|---:|---|---:|",
    ]
    for metric in METRICS:
        for family in FAMILIES:
            f = s[metric][family]
            lines.append(
                f"| {metric} | {LABEL[family]} | {_setting(family, f['global_setting'])}"
                f" | {_pct(f['loss_mean'])} | {_pct(f['loss_max'])}"
                f" | {_where(s, f['loss_argmax'])} | {_pct(f['held_out_loss'])} |"
            )
    return "\n".join(lines)


def axis_table(data: Data) -> str:
    """Mean loss of the global settings per batch size and per schedule length."""
    s, meta = data["summary"], data["meta"]
    lines = [
        "| | `ema_alpha` (pycls) | `ema_alpha`, exact | decay |",
        "|---|---:|---:|---:|",
    ]
    for axis, key, unit in (("batch_size", "batch_sizes", "batch"), ("epochs", "epochs", "")):
        for i, v in enumerate(meta[key]):
            label = f"batch {v}" if unit else f"{v} epochs"
            losses = [s["by_axis"]["final"][f][axis][i] for f in FAMILIES]
            lines.append(f"| {label} | " + " | ".join(_pct(x) for x in losses) + " |")
    return "\n".join(lines)


def config_table(data: Data, metric: str) -> str:
    s = data["summary"]
    out = s[metric]
    lin, exa, con = (out[f] for f in FAMILIES)
    lines = [
        "| batch | epochs | raw | best `ema_alpha` | its acc | at global | loss"
        " | best decay | its acc | at global | loss | exact: best | loss |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c, cfg in enumerate(s["configs"]):
        lines.append(
            f"| {cfg['batch_size']} | {cfg['epochs']}"
            f" | {_pct(out['raw_mean'][c])} ± {_pct(out['raw_std'][c])}"
            f" | {_setting('linear', lin['best_setting'][c])}"
            f" | {_pct(lin['best_mean'][c])} ± {_pct(lin['best_std'][c])}"
            f" | {_pct(lin['global_mean'][c])}"
            f" | {_pct(lin['loss'][c])} ± {_pct(lin['loss_se'][c])}"
            f" | {_setting('constant', con['best_setting'][c])}"
            f" | {_pct(con['best_mean'][c])} ± {_pct(con['best_std'][c])}"
            f" | {_pct(con['global_mean'][c])}"
            f" | {_pct(con['loss'][c])} ± {_pct(con['loss_se'][c])}"
            f" | {_setting('exact', exa['best_setting'][c])} | {_pct(exa['loss'][c])} |"
        )
    return "\n".join(lines)


def half_life_table(data: Data) -> str:
    s = data["summary"]
    lin, con = s["final"]["linear"], s["final"]["constant"]
    lines = [
        "| batch | epochs | best `ema_alpha` | its half-life | at global | best decay"
        " | its half-life | at global | x at global `ema_alpha` |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c, cfg in enumerate(s["configs"]):
        lines.append(
            f"| {cfg['batch_size']} | {cfg['epochs']}"
            f" | {_setting('linear', lin['best_setting'][c])}"
            f" | {lin['best_half_life_fraction'][c]:.2%}"
            f" | {lin['global_half_life_fraction'][c]:.2%}"
            f" | {_setting('constant', con['best_setting'][c])}"
            f" | {con['best_half_life_fraction'][c]:.2%}"
            f" | {con['global_half_life_fraction'][c]:.2%}"
            f" | {s['x_at_global_linear'][c]:.3g} |"
        )
    return "\n".join(lines)


def exact_table(data: Data) -> str:
    """Linear vs exact rule by x, over every (configuration, ema_alpha) pair."""
    lines = [
        "| x = `ema_alpha*n*k/m` | pairs | linear alpha above exact | exact minus linear"
        " accuracy, mean | min | max |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for b in data["summary"]["linear_vs_exact"]:
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


def blocks(data: Data) -> dict[str, str]:
    """The generated blocks of ``docs/invariance.md``, by name."""
    return {
        "headline": headline(data),
        "setup": setup(data),
        "findings": findings(data),
        "losses": loss_table(data),
        "by_axis": axis_table(data),
        "final": config_table(data, "final"),
        "best": config_table(data, "best"),
        "half_life": half_life_table(data),
        "exact": exact_table(data),
    }


BLOCK = re.compile(r"(<!-- BEGIN GENERATED: (\S+) -->\n).*?(\n<!-- END GENERATED: \2 -->)", re.S)


def fill(doc: str, generated: Mapping[str, str]) -> str:
    """``doc`` with every generated block replaced; each block must be there."""
    found = {name for _, name, _ in BLOCK.findall(doc)}
    missing = sorted(set(generated) - found)
    if missing:
        raise ValueError(f"the doc lacks the block(s) {missing}: add their BEGIN/END markers")
    return BLOCK.sub(lambda m: m[1] + generated[m[2]] + m[3], doc)

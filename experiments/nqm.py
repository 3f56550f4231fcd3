"""The noisy quadratic model: which EMA horizon is loss-optimal as batch size and length change?

Zhang et al. (2019), "Which algorithmic choices matter at which batch sizes? Insights
from a noisy quadratic model" (arXiv 1907.04164): a loss ``L(theta) = 1/2 sum_i h_i
theta_i**2`` whose per-sample gradient noise has the covariance ``C = H`` (diagonal),
trained by SGD with batch ``B``. Every mode ``i`` is a scalar AR(1) process, so the
mean and variance of the SGD iterate, of its EMA and their covariance follow exact
recursions (``moments``; derivation in docs/nqm.md), and the expected loss of the EMA
at the end of training has a closed form for every EMA schedule and learning-rate
schedule, computed here for the families of ``ema_jax.schedules`` on the grid of the
digits sweep (experiments/invariance.py): batch 8 to 64, 10 to 40 epochs of 1347
samples, learning rate scaled linearly with the batch.

Run (not part of the test suite; numpy only, about a minute):
  python experiments/nqm.py             # the grid, both learning-rate policies
  python experiments/nqm.py --quick     # 2 batch sizes x 2 lengths, coarse grids (seconds)
  python experiments/nqm.py --write-doc # docs/nqm.md from the JSON
  python experiments/nqm.py --check-doc # exit 1 if the doc is out of date
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import platform
import sys
import time
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import numpy as np

from ema_jax.schedules import gamma_of_sigma_rel

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
JSON_PATH = RESULTS / "nqm.json"
DOC = ROOT / "docs" / "nqm.md"

DIM = 20  # modes h_i = 1/i, i = 1..DIM (Zhang et al.'s spectrum, truncated)
# 20 modes: every mode relaxes within the shortest run, so the end of training is
# dominated by gradient noise, as in the digits sweep (its raw weights jump by points of
# accuracy to the end); 100 modes: the slowest modes are still far from converged.
DIMS = (20, 100)
DATASET = 1347  # samples per epoch: the digits training split
BATCH_SIZES = (8, 16, 32, 64)
EPOCHS = (10, 20, 40)
BASE_LR = 0.25  # at REFERENCE_BATCH, scaled linearly: the digits sweep's rates
REFERENCE_BATCH = 32
POLICIES = ("constant", "cos")  # pycls's OPTIM.LR_POLICY "cos": per epoch, down to 0
GRID_POINTS = 49
QUICK = {"batch_sizes": (16, 64), "epochs": (5, 10), "grid_points": 13}

# Each family's grid, as (low, high) of its hyperparameter, log-spaced.
GRIDS: dict[str, tuple[float, float]] = {  # each reaches a step size of about 1 (no averaging)
    "pycls": (10**-3.5, 10**0.5),  # ema_alpha, rule="linear" (min(1, .) clamps the top)
    "pycls_exact": (10**-3.5, 10**0.5),  # ema_alpha, rule="exact"
    "constant": (10**-4, 1.0),  # 1 - decay
    "halflife": (1.0, 10.0**5),  # half-life in samples
    "power_function": (0.003, 0.25),  # sigma_rel
    "fraction_of_training": (10**-4, 10**-0.5),  # half-life as a share of training
}
PARAMETER = {
    "pycls": "ema_alpha",
    "pycls_exact": "ema_alpha",
    "constant": "1 - decay",
    "halflife": "halflife_samples",
    "power_function": "sigma_rel",
    "fraction_of_training": "halflife_fraction",
}


def spectrum(dim: int = DIM) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Curvatures ``h_i = 1/i``, per-sample noise variances ``c_i = h_i``, start ``theta_0 = 1``."""
    h = 1.0 / np.arange(1, dim + 1, dtype=np.float64)
    return h, h.copy(), np.ones(dim)


def learning_rates(batch: int, epochs: int, policy: str) -> np.ndarray:
    """Every step's learning rate: linear scaling, then constant or pycls's per-epoch cosine."""
    steps = DATASET // batch
    base = BASE_LR * batch / REFERENCE_BATCH
    epoch = np.repeat(np.arange(epochs, dtype=np.float64), steps)
    if policy == "constant":
        return np.full(epoch.shape, base)
    if policy == "cos":  # pycls lr_fun_cos: 0.5 * (1 + cos(pi * cur_epoch / max_epoch))
        return base * 0.5 * (1.0 + np.cos(np.pi * epoch / epochs))
    raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")


def alphas(family: str, values: np.ndarray, batch: int, epochs: int) -> np.ndarray:
    """Step sizes, shape (steps, settings): call ``i`` of ``ema_jax.schedules.<family>``.

    ``update_period`` 1 and no warmup; the schedules' own formulas (checked against
    ``Schedule.alpha_at`` in tests/test_nqm.py).
    """
    total = epochs * (DATASET // batch)
    i = np.arange(total, dtype=np.float64)[:, None]
    v = np.asarray(values, np.float64)[None, :]
    ones = np.ones_like(i)
    if family == "pycls":
        return ones * np.minimum(1.0, v * batch / epochs)
    if family == "pycls_exact":
        return ones * -np.expm1(batch * np.log1p(-v / epochs))
    if family == "constant":
        return ones * v
    if family == "halflife":
        return ones * -np.expm1(-math.log(2.0) * batch / v)
    if family == "fraction_of_training":
        return ones * -np.expm1(-math.log(2.0) / (v * total))
    if family == "power_function":
        gamma = np.array([[gamma_of_sigma_rel(float(x)) for x in v[0]]])
        return 1.0 - (1.0 - 1.0 / (i + 1.0)) ** (gamma + 1.0)
    raise ValueError(f"family must be one of {tuple(GRIDS)}, got {family!r}")


def moments(
    lr: np.ndarray, alpha: np.ndarray, batch: int, dim: int = DIM
) -> tuple[np.ndarray, np.ndarray]:
    """Expected final loss of the EMA (per setting) and of the raw iterate, exactly.

    Per mode, with ``a = 1 - lr*h`` and ``s2 = lr**2 * c / batch``, SGD is
    ``theta' = a theta + noise`` and the EMA ``e' = (1 - alpha) e + alpha theta'``:
    mean ``m``, variance ``v`` of theta; mean ``mu``, variance ``V`` of e; ``X =
    Cov(e, theta)``; the expected loss is ``1/2 sum h (mean**2 + variance)``.
    """
    h, c, theta0 = spectrum(dim)
    settings = alpha.shape[1]
    m, v = theta0.copy(), np.zeros(dim)
    mu = np.broadcast_to(theta0, (settings, dim)).copy()
    var, cov = np.zeros((settings, dim)), np.zeros((settings, dim))
    for eta, al in zip(lr, alpha, strict=True):
        a = 1.0 - eta * h
        m, v = a * m, a * a * v + eta * eta * c / batch
        al = al[:, None]
        keep = 1.0 - al
        var = keep * keep * var + 2.0 * al * keep * a * cov + al * al * v
        cov = keep * a * cov + al * v
        mu = keep * mu + al * m
    return 0.5 * ((mu * mu + var) @ h), 0.5 * float((m * m + v) @ h)


def simulate(
    lr: np.ndarray, alpha: np.ndarray, batch: int, runs: int, seed: int = 0, dim: int = DIM
) -> tuple[np.ndarray, np.ndarray]:
    """Monte Carlo of the same: the final EMA loss of ``runs`` SGD runs, per setting."""
    h, c, theta0 = spectrum(dim)
    rng = np.random.default_rng(seed)
    theta = np.broadcast_to(theta0, (runs, dim)).copy()
    ema = np.broadcast_to(theta0, (alpha.shape[1], runs, dim)).copy()
    for eta, al in zip(lr, alpha, strict=True):
        noise = rng.standard_normal((runs, dim)) * np.sqrt(c / batch)
        theta = theta - eta * (h * theta + noise)
        ema += al[:, None, None] * (theta - ema)
    return 0.5 * (ema * ema) @ h, 0.5 * (theta * theta) @ h  # (settings, runs), (runs,)


def stationary_ema_variance(lr: float, h: float, c: float, batch: int, beta: float) -> float:
    """The EMA's variance at equilibrium, constant ``lr`` and decay ``beta`` (docs/nqm.md)."""
    a = 1.0 - lr * h
    v = lr * lr * c / batch / (1.0 - a * a)
    return v * (1.0 - beta) * (1.0 + beta * a) / ((1.0 + beta) * (1.0 - beta * a))


def grid(family: str, points: int) -> np.ndarray:
    low, high = GRIDS[family]
    return np.geomspace(low, high, points)


def setting_name(policy: str, dim: int) -> str:
    return f"{policy} lr, {dim} modes"


def sweep(
    batch_sizes: Sequence[int], epochs: Sequence[int], points: int, log: Callable[[str], None]
) -> dict[str, Any]:
    """Expected final loss of every family's every setting, per setting and configuration."""
    out: dict[str, Any] = {}
    for dim in DIMS:
        for policy in POLICIES:
            configs = []
            for b in batch_sizes:
                for m in epochs:
                    lr = learning_rates(b, m, policy)
                    losses = {}
                    for family in GRIDS:
                        al = alphas(family, grid(family, points), b, m)
                        ema_loss, raw = moments(lr, al, b, dim)  # raw: the same every time
                        losses[family] = ema_loss.tolist()
                    configs.append({"batch_size": b, "epochs": m, "raw": raw, "losses": losses})
                    log(f"{setting_name(policy, dim)}: batch {b:3d} epochs {m:3d}: raw {raw:.3e}")
            out[setting_name(policy, dim)] = configs
    return out


def run(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 batch sizes x 2 lengths")
    parser.add_argument("--out", default=None, help="output folder for the JSON")
    parser.add_argument("--write-doc", action="store_true", help="only rewrite the doc")
    parser.add_argument("--check-doc", action="store_true", help="only check the doc")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT / "experiments"))
    import invariance_doc  # fill: the generated blocks' filler, shared with the sweep's doc
    import nqm_report  # the analysis and the doc, beside this file

    if args.write_doc or args.check_doc:
        data = json.loads(JSON_PATH.read_text(encoding="utf-8"))
        text = DOC.read_text(encoding="utf-8")
        new = invariance_doc.fill(text, nqm_report.blocks(data))
        if args.check_doc:
            print("docs/nqm.md is " + ("up to date" if new == text else "OUT OF DATE"))
            return 0 if new == text else 1
        DOC.write_text(new, encoding="utf-8")
        return 0
    quick = args.quick
    batch_sizes = QUICK["batch_sizes"] if quick else BATCH_SIZES
    epochs = QUICK["epochs"] if quick else EPOCHS
    points = QUICK["grid_points"] if quick else GRID_POINTS
    start = time.perf_counter()
    results = sweep(batch_sizes, epochs, points, print)
    data = {
        "settings": {
            "dims": list(DIMS),
            "dataset": DATASET,
            "batch_sizes": list(batch_sizes),
            "epochs": list(epochs),
            "base_lr": BASE_LR,
            "reference_batch": REFERENCE_BATCH,
            "policies": list(POLICIES),
            "grids": {f: grid(f, points).tolist() for f in GRIDS},
            "parameter": PARAMETER,
            "quick": quick,
        },
        "results": results,
        "wall_s": round(time.perf_counter() - start, 1),
        "machine": f"{platform.machine()}, numpy {np.__version__}",
    }
    data["summary"] = nqm_report.analyze(data)
    default = ROOT / "workdir" / "nqm-quick" if quick else RESULTS
    out = pathlib.Path(args.out) if args.out else default
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data, separators=(",", ":"))  # compact: most of it is the losses
    (out / "nqm.json").write_text(text + "\n", encoding="utf-8")
    print(nqm_report.text_summary(data))
    print(f"wrote {out / 'nqm.json'} ({data['wall_s']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(run())

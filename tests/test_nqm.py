"""experiments/nqm.py: exact moments against Monte Carlo, the closed form and the schedules.

The noisy quadratic model's recursions (docs/nqm.md) are checked three ways: against a
simulation of SGD and its EMA, against the stationary closed form, and (their step
sizes) against ``ema_jax.schedules``' own ``alpha_at``. The doc's numbers are the JSON's.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from ema_jax import schedules

import invariance_doc
import nqm
import nqm_report

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("policy", nqm.POLICIES)
def test_moments_match_a_simulation_of_sgd_and_its_ema(policy):
    batch, epochs, runs = 16, 2, 3000
    lr = nqm.learning_rates(batch, epochs, policy)
    alpha = nqm.alphas("power_function", np.array([0.05, 0.2]), batch, epochs)
    exact, raw = nqm.moments(lr, alpha, batch, dim=20)
    sampled, sampled_raw = nqm.simulate(lr, alpha, batch, runs=runs, seed=1, dim=20)
    # The sample mean of 3000 independent final losses: within 5 standard errors.
    se = sampled.std(axis=1) / np.sqrt(runs)
    np.testing.assert_array_less(np.abs(sampled.mean(axis=1) - exact), 5 * se)
    assert abs(sampled_raw.mean() - raw) < 5 * sampled_raw.std() / np.sqrt(runs)


@pytest.mark.parametrize("lr, beta", [(0.1, 0.9), (0.5, 0.99), (1.5, 0.5)])
def test_moments_reach_the_stationary_closed_form(lr, beta):
    batch, steps = 4, 4000
    loss, _ = nqm.moments(np.full(steps, lr), np.full((steps, 1), 1 - beta), batch, dim=1)
    variance = 2 * loss[0]  # h = 1, and the mean has decayed to nothing
    closed = nqm.stationary_ema_variance(lr, 1.0, 1.0, batch, beta)
    assert variance == pytest.approx(closed, rel=1e-9)


def _library(family: str, value: float, batch: int, epochs: int) -> schedules.Schedule:
    total = epochs * (nqm.DATASET // batch)
    return {
        "pycls": lambda: schedules.pycls(
            ema_alpha=value, batch_size=batch, max_epoch=epochs, update_period=1
        ),
        "pycls_exact": lambda: schedules.pycls(
            ema_alpha=value, batch_size=batch, max_epoch=epochs, update_period=1, rule="exact"
        ),
        "constant": lambda: schedules.constant(1 - value),
        "halflife": lambda: schedules.halflife(halflife_samples=value, batch_size=batch),
        "power_function": lambda: schedules.power_function(sigma_rel=value, batch_size=batch),
        "fraction_of_training": lambda: schedules.fraction_of_training(
            halflife_fraction=value, total_steps=total
        ),
    }[family]()


@pytest.mark.parametrize("family", sorted(nqm.GRIDS))
def test_step_sizes_are_the_library_schedules(family):
    batch, epochs = 16, 5
    values = nqm.grid(family, 5)[1:-1]  # inside every schedule's valid range
    alpha = nqm.alphas(family, values, batch, epochs)
    for k, value in enumerate(values):
        schedule = _library(family, float(value), batch, epochs)
        for i in (0, 1, 7, 100, alpha.shape[0] - 1):
            assert alpha[i, k] == pytest.approx(schedule.alpha_at(i), rel=1e-12), (family, i)


def test_quick_sweep_runs_from_a_fresh_directory(tmp_path):
    out = tmp_path / "nqm"
    subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "nqm.py"), "--quick", "--out", str(out)],
        check=True,
        cwd=tmp_path,
        capture_output=True,
    )
    data = json.loads((out / "nqm.json").read_text(encoding="utf-8"))
    assert data["summary"] == json.loads(json.dumps(nqm_report.analyze(data)))
    assert set(data["results"]) == {nqm.setting_name(p, d) for p in nqm.POLICIES for d in nqm.DIMS}


def test_doc_holds_the_results_verbatim():
    data = json.loads(nqm.JSON_PATH.read_text(encoding="utf-8"))
    assert not data["settings"]["quick"]
    assert data["summary"] == json.loads(json.dumps(nqm_report.analyze(data)))
    doc = nqm.DOC.read_text(encoding="utf-8")
    assert invariance_doc.fill(doc, nqm_report.blocks(data)) == doc, (
        "docs/nqm.md is out of date: run python experiments/nqm.py --write-doc"
    )

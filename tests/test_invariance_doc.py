"""docs/invariance.md holds the sweeps' numbers verbatim; each JSON's summary is its counts'.

No training: the sweeps (``experiments/invariance.py``) are not part of the test suite.
What the training code computes without training (the learning rates, the families'
step sizes and half-lives) is checked against closed forms.
"""

from __future__ import annotations

import json
import math
import pathlib
import re

import numpy as np
import pytest

import _invariance_families as families
import invariance
import invariance_doc
import invariance_report as report

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "invariance.md"
RESULTS = ROOT / "experiments" / "results"
DATA = invariance.load_results()
BLOCKS = invariance_doc.blocks(DATA)
REGENERATE = "run python experiments/invariance.py --write-doc"
RUNS = [(s, r) for s, d in DATA.items() for r in d["runs"]]


def _id(item):
    setting, run = item
    return f"{setting}-n{run['batch_size']}_m{run['epochs']}"


@pytest.fixture(scope="module")
def doc() -> str:
    return DOC.read_text(encoding="utf-8")


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_doc_holds_the_generated_block_verbatim(doc, name):
    block = f"<!-- BEGIN GENERATED: {name} -->\n{BLOCKS[name]}\n<!-- END GENERATED: {name} -->"
    assert block in doc, f"docs/invariance.md is out of date: {REGENERATE}"


def test_filling_the_doc_changes_nothing(doc):
    assert invariance_doc.fill(doc, BLOCKS) == doc


def test_the_answer_comes_first(doc):
    body = [line for line in doc.splitlines() if line.strip()]
    assert body[0].startswith("# ")
    assert body[1] == "<!-- BEGIN GENERATED: headline -->"
    assert body[2] == invariance_doc.headline(DATA).splitlines()[0]


def test_fill_refuses_a_doc_without_the_blocks():
    with pytest.raises(ValueError, match="lacks the block"):
        invariance_doc.fill("# nothing here\n", BLOCKS)


@pytest.mark.parametrize("setting", sorted(DATA))
def test_the_summary_is_what_the_counts_give(setting):
    assert report.analyze(DATA[setting]) == DATA[setting]["summary"]


def test_both_settings_and_every_family_are_measured():
    assert set(DATA) == {"bn_cos", "gn_const"}
    bn, gn = DATA["bn_cos"]["meta"], DATA["gn_const"]["meta"]
    assert (bn["norm"], bn["precise_batch_stats"], bn["lr_policy"]) == ("batch", True, "cos")
    assert (gn["norm"], gn["precise_batch_stats"], gn["lr_policy"]) == ("group", False, "constant")
    want = {
        "linear",
        "exact",
        "constant",
        "power_function",
        "halflife",
        "fraction_of_training",
        "bema",
    }
    for d in DATA.values():
        assert {f["name"] for f in d["meta"]["families"]} == want
        assert [f["name"] for f in d["meta"]["families"]] == [f.name for f in families.FAMILIES]


@pytest.mark.parametrize("setting", sorted(DATA))
def test_the_sweep_spans_what_the_issue_asks(setting):
    meta = DATA[setting]["meta"]
    assert not meta["quick"]
    n, m = meta["batch_sizes"], meta["epochs"]
    assert len(n) >= 4 and max(n) / min(n) >= 8
    assert len(m) >= 3 and max(m) / min(m) >= 4
    assert len(meta["seeds"]) >= 3
    for f in meta["families"]:
        grid = np.log10(f["grid"]) if f["log_scale"] else np.asarray(f["grid"])
        steps = np.diff(grid)
        # Evenly spaced, increasing; power_function's ends at 0.25, below its cap (~0.29).
        even = steps[:-1] if f["name"] == "power_function" else steps
        assert len(grid) >= 6 and np.allclose(even, steps[0]) and (steps > 0).all(), f["name"]
    runs = DATA[setting]["runs"]
    assert [(r["batch_size"], r["epochs"]) for r in runs] == [(a, b) for a in n for b in m]


@pytest.mark.parametrize("item", RUNS, ids=_id)
def test_every_run_holds_every_number(item):
    setting, run = item
    meta = DATA[setting]["meta"]
    columns = 1 + sum(len(f["grid"]) for f in meta["families"])
    correct, nll = np.asarray(run["correct"]), np.asarray(run["nll"])
    assert correct.shape == nll.shape == (len(meta["seeds"]), columns)
    assert correct.min() >= 0 and correct.max() <= meta["test_size"]
    assert np.isfinite(nll).all() and nll.min() > 0
    assert len(run["names"]) == columns - 1 == meta["averages_per_run"]
    assert run["steps_per_epoch"] == meta["train_size"] // run["batch_size"]
    assert run["learning_rate"] == meta["base_lr"] * run["batch_size"] / meta["reference_batch"]


@pytest.mark.parametrize("item", RUNS, ids=_id)
def test_half_life_shares_follow_the_closed_forms(item):
    # pycls: ln 2 / -ln(1 - alpha) updates, one per step; constant: ln 2 / -ln(decay)
    # steps; halflife: h / n steps; fraction_of_training: its own value.
    setting, run = item
    meta = DATA[setting]["meta"]
    n, m, spe = run["batch_size"], run["epochs"], run["steps_per_epoch"]
    total = m * spe
    hl = run["half_life_fraction"]
    grids = {f["name"]: f["grid"] for f in meta["families"]}
    for a in grids["linear"]:
        alpha = min(1.0, a * n / m)
        want = 0.0 if alpha == 1.0 else math.log(2) / -math.log1p(-alpha) / total
        assert hl[f"linear:{a:.6g}"] == pytest.approx(want, rel=1e-9, abs=1e-12)
    for v in grids["constant"]:
        want = math.log(2) / -math.log1p(-v) / total
        assert hl[f"constant:{v:.6g}"] == pytest.approx(want, rel=1e-6)
    for v in grids["halflife"]:
        alpha = -math.expm1(-math.log(2) * n / v)
        want = math.log(2) / -math.log1p(-alpha) / total
        assert hl[f"halflife:{v:.6g}"] == pytest.approx(want, rel=1e-6)
    for v in grids["fraction_of_training"]:
        assert hl[f"fraction_of_training:{v:.6g}"] == pytest.approx(v, rel=1e-6)


@pytest.mark.parametrize("setting", sorted(DATA))
def test_the_plot_is_there(setting):
    assert (RESULTS / f"invariance_{setting}.png").stat().st_size > 10_000


def test_the_theory_table_reads_the_nqm_json():
    nqm = json.loads(invariance_doc.NQM_JSON.read_text(encoding="utf-8"))
    table = invariance_doc.theory(DATA, nqm)
    for setting, policy in invariance_doc.NQM_POLICY.items():
        first = nqm["summary"][policy]["ranking"][0]
        name = {v: k for k, v in invariance_doc.NQM_NAME.items()}.get(first, first)
        row = next(line for line in table.splitlines() if line.startswith(f"| {name} |"))
        assert "| 1 |" in row, (setting, row)


# -- what the training code computes, without training -----------------------------------


def test_pycls_cosine_learning_rate_per_epoch():
    import _invariance_train as train

    setting, config = train.SETTINGS["bn_cos"], train.Config(batch_size=64, epochs=4)
    lrs = train.learning_rates(setting, config, steps_per_epoch=3)
    base = setting.base_lr * 64 / train.REFERENCE_BATCH
    # pycls get_epoch_lr: epoch 0 at WARMUP_FACTOR (alpha = 0/1), then 0.5(1 + cos(pi e/m)).
    cosine = [base * 0.5 * (1 + math.cos(math.pi * e / 4)) for e in (1, 2, 3)]
    want = [base * train.WARMUP_FACTOR, *cosine]
    np.testing.assert_allclose(lrs, np.repeat(want, 3), rtol=1e-12)


def test_constant_learning_rate_warms_up_linearly():
    import _invariance_train as train

    setting, config = train.SETTINGS["gn_const"], train.Config(batch_size=32, epochs=2)
    lrs = train.learning_rates(setting, config, steps_per_epoch=4)
    ramp = np.minimum(np.arange(8) / 4, 1.0)
    np.testing.assert_allclose(lrs, setting.base_lr * (0.1 + 0.9 * ramp), rtol=1e-12)


@pytest.mark.parametrize("family", families.FAMILIES, ids=lambda f: f.name)
def test_every_family_builds_at_every_setting(family):
    context = families.Context(
        batch_size=16, epochs=10, steps_per_epoch=84, warmup_epochs=1, update_period=1
    )
    for value in family.grid:
        built = family.build(value, context)
        assert families.half_life_fraction(built, context) is not None
    names = [family.setting(v) for v in family.grid]
    assert len(set(names)) == len(names)


# Numbers the prose may state because they are names, references or definitions.
ALLOWED_IN_PROSE = {"0", "1", "2", "168", "2017", "2019", "2024", "2025"}


def test_prose_states_no_computed_numbers(doc):
    prose = re.sub(
        r"<!-- BEGIN GENERATED: (\S+) -->.*?<!-- END GENERATED: \1 -->", "", doc, flags=re.S
    )
    prose = re.sub(r"```.*?```", "", prose, flags=re.S)
    prose = re.sub(r"`[^`]*`", "", prose)
    prose = re.sub(r"\]\([^)]*\)", "]", prose)  # link targets
    numbers = {n.rstrip(".,") for n in re.findall(r"\d[\d.,]*%?", prose)}
    assert numbers <= ALLOWED_IN_PROSE, "put computed numbers in a generated block"

"""docs/invariance.md holds the sweep JSON's numbers verbatim; the JSON's summary is its counts'.

No training: the sweep (``experiments/invariance.py``) is not part of the test suite.
"""

from __future__ import annotations

import json
import math
import pathlib
import re

import numpy as np
import pytest

import invariance_doc
import invariance_report as report

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "invariance.md"
RESULTS = ROOT / "experiments" / "results"
DATA = json.loads((RESULTS / "invariance.json").read_text(encoding="utf-8"))
BLOCKS = invariance_doc.blocks(DATA)
REGENERATE = "run python experiments/invariance.py --write-doc"


@pytest.fixture(scope="module")
def doc() -> str:
    return DOC.read_text(encoding="utf-8")


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_doc_holds_the_generated_block_verbatim(doc, name):
    block = f"<!-- BEGIN GENERATED: {name} -->\n{BLOCKS[name]}\n<!-- END GENERATED: {name} -->"
    assert block in doc, f"docs/invariance.md is out of date: {REGENERATE}"


def test_filling_the_doc_changes_nothing(doc):
    assert invariance_doc.fill(doc, BLOCKS) == doc


def test_the_result_sentence_comes_first(doc):
    body = [line for line in doc.splitlines() if line.strip()]
    assert body[0].startswith("# ")
    assert body[1] == "<!-- BEGIN GENERATED: headline -->"
    assert body[2] == invariance_doc.headline(DATA)


def test_fill_refuses_a_doc_without_the_blocks():
    with pytest.raises(ValueError, match="lacks the block"):
        invariance_doc.fill("# nothing here\n", BLOCKS)


def test_the_summary_is_what_the_counts_give():
    assert report.analyze(DATA) == DATA["summary"]


def test_the_sweep_spans_what_the_issue_asks():
    meta = DATA["meta"]
    assert not meta["quick"]
    n, m = meta["batch_sizes"], meta["epochs"]
    assert len(n) >= 4 and max(n) / min(n) >= 8
    assert len(m) >= 3 and max(m) / min(m) >= 4
    assert len(meta["seeds"]) >= 3
    for grid in (meta["ema_alphas"], [1 - d for d in meta["decays"]]):
        steps = np.diff(np.log10(grid))
        assert len(grid) >= 6 and np.allclose(steps, steps[0]) and steps[0] > 0
    assert [(r["batch_size"], r["epochs"]) for r in DATA["runs"]] == [(a, b) for a in n for b in m]


@pytest.mark.parametrize("run", DATA["runs"], ids=lambda r: f"n{r['batch_size']}_m{r['epochs']}")
def test_every_run_holds_every_count(run):
    meta = DATA["meta"]
    correct = np.asarray(run["correct"])
    columns = 1 + 2 * len(meta["ema_alphas"]) + len(meta["decays"])
    assert correct.shape == (len(meta["seeds"]), run["epochs"], columns)
    assert correct.min() >= 0 and correct.max() <= meta["test_size"]
    assert len(run["names"]) == columns - 1 == meta["averages_per_run"]
    assert run["steps_per_epoch"] == meta["train_size"] // run["batch_size"]
    assert run["learning_rate"] == meta["base_lr"] * run["batch_size"] / meta["reference_batch"]


def test_half_life_shares_follow_the_closed_forms():
    # pycls: ln 2 / -ln(1 - alpha) updates, one per step; constant: ln 2 / -ln(decay) steps.
    meta = DATA["meta"]
    for run in DATA["runs"]:
        n, m, spe = run["batch_size"], run["epochs"], run["steps_per_epoch"]
        hl = run["half_life_fraction"]
        linear = run["names"][: len(meta["ema_alphas"])]
        constant = run["names"][2 * len(meta["ema_alphas"]) :]
        for a, name in zip(meta["ema_alphas"], linear, strict=True):
            alpha = min(1.0, a * n / m)
            want = 0.0 if alpha == 1.0 else math.log(2) / -math.log1p(-alpha) / (m * spe)
            assert hl[name] == pytest.approx(want, rel=1e-9, abs=1e-12)
        for d, name in zip(meta["decays"], constant, strict=True):
            assert hl[name] == pytest.approx(math.log(2) / -math.log(d) / (m * spe), rel=1e-6)


def test_the_plot_is_there():
    assert (RESULTS / "invariance.png").stat().st_size > 10_000


# Numbers the prose may state because they are names, references or definitions.
ALLOWED_IN_PROSE = {"0", "1", "168", "2017", "2023"}


def test_prose_states_no_computed_numbers(doc):
    prose = re.sub(
        r"<!-- BEGIN GENERATED: (\S+) -->.*?<!-- END GENERATED: \1 -->", "", doc, flags=re.S
    )
    prose = re.sub(r"```.*?```", "", prose, flags=re.S)
    prose = re.sub(r"`[^`]*`", "", prose)
    prose = re.sub(r"\]\([^)]*\)", "]", prose)  # link targets
    numbers = {n.rstrip(".,") for n in re.findall(r"\d[\d.,]*%?", prose)}
    assert numbers <= ALLOWED_IN_PROSE, "put computed numbers in a generated block"

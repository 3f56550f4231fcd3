"""docs/posthoc.md: its tables are the code's, verbatim, and its claims hold."""

from __future__ import annotations

import pathlib
import re

import numpy as np
import pytest

from ema_jax import posthoc
from ema_jax import schedules

import posthoc_tables

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "posthoc.md"
TABLES = posthoc_tables.markdown_tables()
# Numbers the prose may state because they are definitions, names or inputs, not results.
ALLOWED_IN_PROSE = {"0", "1", "2", "3", "12", "0.05", "0.07", "0.10", "1000", "2024", "50"}


@pytest.fixture(scope="module")
def doc() -> str:
    return DOC.read_text(encoding="utf-8")


@pytest.mark.parametrize("name", sorted(TABLES))
def test_doc_holds_the_generated_table_verbatim(doc, name):
    block = f"<!-- BEGIN GENERATED: {name} -->\n{TABLES[name]}\n<!-- END GENERATED: {name} -->"
    assert block in doc, "docs/posthoc.md is out of date: run python docs/posthoc_tables.py"


def test_filling_the_doc_changes_nothing_and_the_timings_are_there(doc):
    assert posthoc_tables.fill(doc, TABLES) == doc
    measured = re.search(
        r"<!-- BEGIN GENERATED: measured -->\n(.+?)\n<!-- END GENERATED: measured -->", doc, re.S
    )
    assert measured is not None and "| reconstruct 5 sigma_rels (s) |" in measured.group(1)


def test_prose_states_no_computed_numbers(doc):
    prose = re.sub(
        r"<!-- BEGIN GENERATED: (\S+) -->.*?<!-- END GENERATED: \1 -->", "", doc, flags=re.S
    )
    prose = re.sub(r"```.*?```", "", prose, flags=re.S)
    prose = re.sub(r"`[^`]*`", "", prose)
    prose = re.sub(r"\b(b?float|int)\d+\b|\bL2\b|CRC-32|Eq\. 3|C\.2|ViT-B/16|ResNet-50", "", prose)
    numbers = {n.rstrip(".,") for n in re.findall(r"\d[\d.,]*%?", prose)}
    assert numbers <= ALLOWED_IN_PROSE, "put computed numbers in a generated table"


def test_the_claims_about_the_tables_hold():
    conditioning = posthoc_tables.conditioning_rows()
    # "nothing is dropped": the full rank in the whole range; scaling lowers cond(A).
    assert all(rank == size for _, _, _, rank, size in conditioning)
    assert all(scaled < raw for _, raw, scaled, _, _ in conditioning)
    # "the residual falls about as 1/N**2" between the tracked widths, and the weights
    # stay small there; widths below them need larger weights.
    rows = posthoc_tables.accuracy_rows()
    counts = np.log([r[0] for r in rows])
    for k, target in enumerate(posthoc_tables.TARGETS):
        residuals, sums = [r[1 + 2 * k] for r in rows], [r[2 + 2 * k] for r in rows]
        if target in (0.07, 0.15):
            slope = np.polyfit(counts, np.log(residuals), 1)[0]
            assert -2.2 < slope < -1.8
            assert max(sums) < 2
        if target < min(posthoc_tables.TRACKED):
            assert min(sums) > 5


def test_scaling_every_time_changes_neither_the_weights_nor_the_conditioning():
    times, gammas = posthoc_tables.profiles(30)
    gamma = schedules.gamma_of_sigma_rel(0.07)
    one = posthoc.solve(times, gammas, time=30.0, gamma=gamma)
    for scale in (256.0, 1e6):
        other = posthoc.solve(times * scale, gammas, time=30.0 * scale, gamma=gamma)
        np.testing.assert_allclose(other.weights, one.weights, rtol=1e-8, atol=1e-10)
        assert other.cond == pytest.approx(one.cond, rel=1e-8)


def test_the_thresholds_table_is_of_the_library_and_the_bf16_table_of_its_json():
    # The thresholds come from posthoc's constants, and the offsets grow with them.
    rows = posthoc_tables.threshold_rows()
    assert [r[1] for r in rows] == [posthoc.WARN_RESIDUAL, posthoc.MAX_RESIDUAL]
    assert 0 < rows[0][2] < rows[1][2]
    # The offset is the width change whose profile is that far away (the definition).
    s = 0.07 * (1 + rows[0][2])
    target, other = schedules.gamma_of_sigma_rel(0.07), schedules.gamma_of_sigma_rel(s)
    own = posthoc.profile_inner(1.0, target, 1.0, target)
    distance = np.sqrt(
        (own - 2 * posthoc.profile_inner(1.0, other, 1.0, target)) / own
        + posthoc.profile_inner(1.0, other, 1.0, other) / own
    )
    assert distance == pytest.approx(posthoc.WARN_RESIDUAL, rel=1e-6)
    # The bf16 measurements are committed and rendered (the parametrized test checks the doc).
    assert posthoc_tables.BF16_JSON.exists() and "bf16" in TABLES

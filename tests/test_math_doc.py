"""docs/math.md: its tables are the code's, verbatim, and its prose computes nothing by hand."""

from __future__ import annotations

import math
import pathlib
import re

import pytest

from ema_jax.schedules import _pycls as _schedule

import math_tables as _math_tables

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "math.md"
TABLES = _math_tables.markdown_tables()


@pytest.fixture(scope="module")
def doc() -> str:
    return DOC.read_text(encoding="utf-8")


@pytest.mark.parametrize("name", sorted(TABLES))
def test_doc_holds_the_generated_table_verbatim(doc, name):
    block = f"<!-- BEGIN GENERATED: {name} -->\n{TABLES[name]}\n<!-- END GENERATED: {name} -->"
    assert block in doc, "docs/math.md is out of date: run python docs/make_math_tables.py"


def test_filling_the_doc_changes_nothing(doc):
    assert _math_tables.fill(doc, TABLES) == doc


def test_fill_refuses_a_doc_without_the_blocks():
    with pytest.raises(ValueError, match="lacks the block"):
        _math_tables.fill("# nothing here\n", TABLES)


# Numbers the prose may state because they are definitions, names or inputs, not results.
ALLOWED_IN_PROSE = {"0", "1", "2", "168", "2023", "1%", "50"}


def test_prose_states_no_computed_numbers(doc):
    prose = re.sub(
        r"<!-- BEGIN GENERATED: (\S+) -->.*?<!-- END GENERATED: \1 -->", "", doc, flags=re.S
    )
    prose = re.sub(r"```.*?```", "", prose, flags=re.S)
    prose = re.sub(r"`[^`]*`", "", prose)
    prose = re.sub(r"\b(b?float|int)\d+\b", "", prose)
    numbers = set(re.findall(r"\d[\d.,]*%?", prose))
    numbers = {n.rstrip(".,") for n in numbers}
    assert numbers <= ALLOWED_IN_PROSE, "put computed numbers in a generated table"


def test_error_thresholds_match_the_closed_form():
    # mission.md: above 1% at x ≈ 0.02, 5% at 0.098, 10% at 0.194.
    found = [_math_tables.error_threshold(level) for level in (0.01, 0.05, 0.1)]
    assert [round(x, 3) for x in found] == [0.02, 0.098, 0.194]
    for level, x in zip((0.01, 0.05, 0.1), found, strict=True):
        assert _math_tables.linear_vs_exact_error(x) == pytest.approx(level, rel=1e-9)


@pytest.mark.parametrize("row", _math_tables.linear_vs_exact_table())
def test_error_table_rows_follow_the_rules(row):
    x, linear, exact, error, error_at_nk, half = row
    nk = _math_tables.SAMPLES_PER_UPDATE
    assert linear == _schedule.alpha_linear(x / nk, nk, 1.0, 1)
    assert exact == pytest.approx(1 - math.exp(-x), rel=1e-12)
    assert error == pytest.approx(linear / exact - 1, rel=1e-12)
    # The limit is close: at n*k = 4096 the error differs by well under a percent of itself.
    assert error_at_nk == pytest.approx(error, rel=5e-3)
    assert half == x / 2
    if x < 0.1:
        assert error == pytest.approx(x / 2, rel=0.05)

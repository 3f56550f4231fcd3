"""docs/migrating.md: every row's ema_jax line against the peer's code (tests/support/anchors.py).

Rows run in float64 (``jax.enable_x64``) against the float64 transcriptions, to 1e-9 of
the trajectory's range: the line reproduces the peer up to the order of float64
operations. Rows marked ``float32`` run in float32 against the float32 transcription of
nnx.EMA, to float32 rounding. Every measured number the doc states is recomputed here
to its 2 significant digits.
"""

from __future__ import annotations

import itertools
import pathlib

import jax
import jax.numpy as jnp
import migrating_table
import numpy as np
import pytest
from migrating_table import ROWS
from migrating_table import Row
from support import anchors
from support import fp32_tolerance

import ema_jax
from ema_jax import schedules

from conftest import make_trajectory

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "migrating.md"
NAMES = ("w", "b")  # the float leaves; the peers differ on integer buffers on purpose


def trajectory_for(row: Row) -> list[dict]:
    dtype = np.float32 if row.float32 else np.float64
    return [{n: t[n] for n in NAMES} for t in make_trajectory(migrating_table.CALLS, dtype=dtype)]


def build(line: str):
    return eval(line, {"ema_jax": ema_jax, "schedules": schedules, "d": migrating_table.D})


def theirs(row: Row, trajectory: list[dict]) -> list[list[dict]]:
    """The peer's EMA after each call, one list per average."""
    anchor = getattr(anchors, row.anchor)
    if row.feed == "keras":
        return [anchor(steps(trajectory), trajectory[0], **row.anchor_kwargs)[0]]
    several = isinstance(row.anchor_kwargs, tuple)
    return [
        anchor(trajectory, **kw) for kw in (row.anchor_kwargs if several else (row.anchor_kwargs,))
    ]


def steps(trajectory: list[dict]) -> list[dict]:
    return [{n: b[n] - a[n] for n in NAMES} for a, b in itertools.pairwise(trajectory)]


def ours(line: str, row: Row, trajectory: list[dict]) -> list[list[dict]]:
    """ema_jax's EMA after each call, fed as the row says, one list per average."""
    ema = build(line)
    update = jax.jit(ema.update)
    start = trajectory[0]
    if row.feed == "zeros":
        start = jax.tree.map(np.zeros_like, start)
    state = ema.init(jax.tree.map(jnp.asarray, start))
    params = trajectory[1:]
    if row.feed == "first twice":
        state = update(jax.tree.map(jnp.asarray, params[0]), state)
    out = []
    if row.feed == "keras":
        every = row.anchor_kwargs.get("ema_overwrite_frequency")
        model = jax.tree.map(jnp.asarray, trajectory[0])
        for i, step in enumerate(steps(trajectory)):
            model = jax.tree.map(lambda v, s: v + s, model, step)
            state = update(model, state)
            if every and (i + 1) % every == 0:
                model = state.ema  # what Keras's ema_overwrite_frequency does
            out.append(jax.tree.map(np.asarray, state.ema))
    else:
        for p in params:
            state = update(jax.tree.map(jnp.asarray, p), state)
            out.append(jax.tree.map(np.asarray, state.ema))
    count = len(ema.schedules) if ema.several else 1
    if count == 1:
        return [out]
    return [[ema.average(e, k) for e in out] for k in range(count)]


def span(trajectory: list[dict]) -> float:
    values = np.concatenate([t[n].ravel() for t in trajectory for n in NAMES])
    return float(values.max() - values.min())


def largest_difference(a: list[list[dict]], b: list[list[dict]], start: int = 0) -> np.ndarray:
    """The largest |difference| of any weight at each call from ``start``, over the averages."""
    per_call = []
    for run_a, run_b in zip(a, b, strict=True):
        per_call.append(
            [
                max(float(np.max(np.abs(np.float64(x[n]) - y[n]))) for n in NAMES)
                for x, y in zip(run_a[start:], run_b[start:], strict=True)
            ]
        )
    return np.max(np.array(per_call), axis=0)


def run(line: str, row: Row) -> tuple[np.ndarray, float]:
    trajectory = trajectory_for(row)
    reference = theirs(row, trajectory)
    if row.float32:
        got = ours(line, row, trajectory)
    else:
        with jax.enable_x64(True):
            got = ours(line, row, trajectory)
    return largest_difference(got, reference, row.compare_from), span(trajectory)


@pytest.mark.parametrize("row", ROWS, ids=[r.peer for r in ROWS])
def test_each_row_is_the_peer_or_as_far_as_the_doc_says(row):
    diff, scale = run(row.ours, row)
    if row.exact:
        trajectory = trajectory_for(row)
        tolerance = fp32_tolerance(trajectory) if row.float32 else 1e-9 * scale
        if row.bitwise:
            tolerance = 0.0
        assert diff.max() <= tolerance, f"{diff.max()} > {tolerance}"
    else:
        assert f"{diff[-1] / scale:.2g}" == row.measured


@pytest.mark.parametrize("row", [r for r in ROWS if r.naive], ids=lambda r: r.peer)
def test_the_tempting_line_is_as_far_as_the_doc_says(row):
    fed = row._replace(feed="as is") if row.feed == "first twice" else row
    diff, scale = run(row.naive, fed)
    assert f"{diff[-1] / scale:.2g}" == row.measured


def test_the_doc_holds_the_table_and_names_every_peer():
    doc = DOC.read_text(encoding="utf-8")
    assert migrating_table.fill(doc) == doc, "run python docs/migrating_table.py"
    missing = [peer for peer in migrating_table.PEERS if peer not in doc]
    assert not missing


def test_every_row_is_one_expression_that_builds_a_transform():
    for row in ROWS:
        for line in (row.ours, row.naive):
            if line is not None:
                assert "\n" not in line
                assert callable(build(line).update)


def test_ema_pytorch_with_its_decay_in_float64_is_the_row_exactly():
    # The row's only difference is ema-pytorch's float32 decay (the doc says so).
    row = next(r for r in ROWS if r.peer == "ema-pytorch EMA")
    row = row._replace(anchor_kwargs={**row.anchor_kwargs, "float32_decay": False})
    diff, scale = run(row.ours, row)
    assert diff.max() <= 1e-9 * scale

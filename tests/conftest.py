"""Shared fixtures: small parameter trees and trajectories of them."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest


def make_trajectory(
    steps: int, seed: int = 0, dtype: np.dtype = np.float32
) -> list[dict[str, np.ndarray]]:
    """``steps + 1`` parameter dicts: the initial model, then one per optimizer step.

    A random walk, so that every update moves the EMA by a different amount; an
    int32 leaf (like BatchNorm's ``num_batches_tracked``) counts the steps.
    """
    rng = np.random.default_rng(seed)
    params = {
        "w": rng.normal(size=(3, 4)).astype(dtype),
        "b": rng.normal(size=(4,)).astype(dtype),
        "count": np.zeros((), np.int32),
    }
    out = [params]
    for i in range(steps):
        params = {
            "w": (params["w"] + rng.normal(scale=0.5, size=(3, 4))).astype(dtype),
            "b": (params["b"] + rng.normal(scale=0.5, size=(4,))).astype(dtype),
            "count": np.array(i + 1, np.int32),
        }
        out.append(params)
    return out


@pytest.fixture
def trajectory() -> list[dict[str, np.ndarray]]:
    return make_trajectory(40)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Counts the bad-input catalogue's cases (tests marked ``bad_input``), as issue 7 asks."""
    passed = [r for r in terminalreporter.stats.get("passed", []) if "bad_input" in r.keywords]
    if not passed:
        return
    by_file: dict[str, int] = {}
    for report in passed:
        path = report.nodeid.split("::", 1)[0]
        by_file[path] = by_file.get(path, 0) + 1
    entries = {
        r.nodeid.split("[", 1)[1].split(":", 1)[0]
        for r in passed
        if "test_bad_input_raises_a_clear_error[" in r.nodeid
    }
    files = ", ".join(f"{n} in {path}" for path, n in sorted(by_file.items()))
    terminalreporter.write_line(
        f"bad-input catalogue: {len(passed)} cases passed ({files}); the catalogue table"
        f" covers {len(entries)} entry points: {', '.join(sorted(entries))}"
    )

"""Post-hoc EMA on a short digits run (examples/posthoc_digits.py --quick): the
reconstructions match the averages tracked directly in the same run, within the bound
derived in tests/support/posthoc_bound.py, evaluated on the run's recorded weights."""

from __future__ import annotations

import importlib.util
import pathlib

import jax
import numpy as np
import pytest
from support import posthoc_bound

from ema_jax import posthoc

EXAMPLE = pathlib.Path(__file__).parents[1] / "examples" / "posthoc_digits.py"
# The bound must sit well below the gap to the nearest tracked average (12 snapshots per
# average here; extrapolating to 0.03 is looser).
TEETH = {0.03: 0.5, 0.07: 0.1, 0.15: 0.1}


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("posthoc_digits", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


def test_digits_reconstructions_match_the_averages_tracked_directly(example, tmp_path, capsys):
    trajectory = []  # what the EMA folds in after every step: params and BN statistics

    def record(state):
        trajectory.append(flat({"params": state.params, "batch_stats": state.batch_stats}))

    result = example.main(["--quick", "--workdir", str(tmp_path)], on_step=record)
    out = capsys.readouterr().out
    assert "sigma_rel  val loss  post-hoc    loss    direct    loss  max |gap|  residual" in out
    # sigma_rel is chosen on the validation split, among the widths the snapshots reach;
    # the validation images are carved from the training images, apart from the test ones.
    reached = [r for r in result["rows"] if r["residual"] <= posthoc.WARN_RESIDUAL]
    assert result["chosen"] == min(reached, key=lambda r: r["val_loss"])
    assert f"chosen on the validation split: sigma_rel {result['chosen']['sigma_rel']:g}" in out
    x_train, _, x_val, _, x_test, _ = example.load_splits(True)
    assert len(x_train) == 256 and len(x_val) > 200
    seen = {x.tobytes() for x in x_train} | {x.tobytes() for x in x_test}
    assert not any(x.tobytes() in seen for x in x_val)
    assert (tmp_path / "posthoc.png").stat().st_size > 0
    assert result["steps"] == list(range(4, 49, 4))
    assert len(trajectory) == 49
    assert {r["sigma_rel"] for r in result["rows"]} >= set(result["direct"])

    state = result["state"]
    schedules = dict(zip(state.ema.names, state.ema.schedules, strict=True))
    trajectory = np.stack(trajectory)
    direct = sorted(result["direct"])
    found = posthoc.coefficients(result["snapshots"], direct)
    # 12 snapshots per average: 0.03 is flagged (residual above WARN_RESIDUAL), still
    # within the bound, which accounts for the residual.
    with pytest.warns(posthoc.ExtrapolationWarning, match="sigma_rel=0.03 "):
        results = posthoc.reconstruct(result["snapshots"], direct)
    for sigma_rel, got, c in zip(direct, results, found, strict=True):
        name = f"{sigma_rel:g}"
        tracked = flat(state.ema_variables(name))
        got = flat(got)
        bound, _ = posthoc_bound.tolerance(c, schedules, schedules[name], trajectory, got)
        error = np.abs(got - tracked)
        assert np.all(error <= bound), (sigma_rel, float(np.max(error / bound)))
        gap = min(
            np.max(np.abs(flat(state.ema_variables(f"{s:g}")) - tracked)) for s in (0.05, 0.1)
        )
        assert np.max(bound) < TEETH[sigma_rel] * gap, (sigma_rel, np.max(bound) / gap)

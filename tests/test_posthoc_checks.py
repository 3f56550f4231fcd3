"""Post-hoc reconstructions that would be silently wrong: targets the snapshots do not
reach, snapshots of two runs in one directory, a stale snapshot kept on resume."""

from __future__ import annotations

import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ema_jax import posthoc
from ema_jax import schedules


def write_run(
    directory, *, steps, every, batch_size=8, sigma_rels=(0.05, 0.10), seed=0, start=None
):
    """Trackers over a random walk (step ``k``'s increment drawn from ``(seed, k)``), with
    snapshots every ``every`` steps; from ``start = (step, state, params)`` if given.
    Returns the EMA, its state and the parameters at ``steps``."""
    ema = posthoc.trackers(sigma_rels, batch_size=batch_size)
    first, state, params = start or (0, None, {"w": jnp.zeros(16)})
    state = ema.init(params) if state is None else state
    update = jax.jit(ema.update)
    with posthoc.Snapshots(directory, snapshot_every=every) as snapshots:
        for step in range(first + 1, steps + 1):
            draw = np.random.default_rng([seed, step]).normal(size=16)
            params = {"w": params["w"] + jnp.asarray(draw, jnp.float32)}
            state = update(params, state)
            snapshots.save(state, ema=ema, step=step)
    return ema, state, params


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    """Snapshots of 0.05 and 0.10 at steps 10, 20, 30."""
    directory = tmp_path_factory.mktemp("three")
    write_run(directory, steps=30, every=10)
    return directory


# --- extrapolation ----------------------------------------------------------------------


@pytest.mark.bad_input
@pytest.mark.parametrize(("sigma_rel", "low"), [(0.001, 0.95), (0.28, 0.44)])
def test_a_width_far_outside_the_trackers_raises_with_the_residual(three, sigma_rel, low):
    # Before: weights with these residuals came back without a word.
    (c,) = posthoc.coefficients(three, [sigma_rel])
    assert c.residual > low  # the residuals were measured at other snapshot times
    with pytest.raises(posthoc.ExtrapolationError) as raised:
        posthoc.reconstruct(three, sigma_rel)
    message = str(raised.value)
    assert f"residual {c.residual:.2g}" in message and "allow_extrapolation=True" in message
    # The suggested trackers span the target and reach it from the same snapshot steps.
    pair = tuple(
        float(x) for x in re.search(r"trackers\(\(([\d.]+), ([\d.]+)\)\)", message).groups()
    )
    assert pair[0] <= sigma_rel <= pair[1]
    times = [float(10 * k * 8) for k in (1, 2, 3)]
    gammas = [schedules.gamma_of_sigma_rel(s) for s in pair for _ in times]
    solution = posthoc.solve(
        times * 2, gammas, time=times[-1], gamma=schedules.gamma_of_sigma_rel(sigma_rel)
    )
    assert f"residual {solution.residual:.2g} with these snapshot steps" in message
    assert solution.residual < c.residual / 4
    # Allowed: the result, with the warning.
    with pytest.warns(posthoc.ExtrapolationWarning, match=f"residual {c.residual:.2g}"):
        variables = posthoc.reconstruct(three, sigma_rel, allow_extrapolation=True)
    assert variables["w"].shape == (16,)


@pytest.mark.bad_input
def test_a_single_snapshot_warns_with_the_residual(tmp_path):
    write_run(tmp_path, steps=10, every=10)
    (c,) = posthoc.coefficients(tmp_path, [0.07])
    assert posthoc.WARN_RESIDUAL < c.residual < posthoc.MAX_RESIDUAL  # 0.056
    with pytest.warns(posthoc.ExtrapolationWarning) as caught:
        posthoc.reconstruct(tmp_path, 0.07)
    (warning,) = caught
    assert warning.filename == __file__  # points at the caller's line
    assert "from a single snapshot" in str(warning.message)
    assert f"residual {c.residual:.2g}" in str(warning.message)
    assert "save more snapshots" in str(warning.message)


def test_a_width_the_snapshots_reach_is_silent(tmp_path):
    write_run(tmp_path, steps=60, every=5)  # 12 snapshots per average
    (c,) = posthoc.coefficients(tmp_path, [0.07])
    assert c.residual <= posthoc.WARN_RESIDUAL
    posthoc.reconstruct(tmp_path, 0.07)  # warnings are errors in this suite


@pytest.mark.bad_input
def test_allow_extrapolation_must_be_a_bool(three):
    with pytest.raises(ValueError, match="allow_extrapolation"):
        posthoc.reconstruct(three, 0.07, allow_extrapolation="yes")


# --- two runs in one directory ------------------------------------------------------------


@pytest.mark.bad_input
def test_snapshots_of_two_batch_sizes_in_one_directory_are_refused(tmp_path):
    write_run(tmp_path / "a", steps=20, every=10, batch_size=8)
    write_run(tmp_path / "b", steps=40, every=10, batch_size=16)
    for step in ("30", "40"):  # run b's later snapshots moved in beside run a's
        shutil.copytree(tmp_path / "b" / step, tmp_path / "a" / step)
    # Before: reconstructed without complaint, with each snapshot's own times.
    for call in (posthoc.reconstruct, posthoc.coefficients):
        with pytest.raises(posthoc.SnapshotMismatchError) as raised:
            call(tmp_path / "a", 0.07)
        message = str(raised.value)
        assert "steps [10, 20] differ from step 40" in message
        assert "'0.05' has batch_size 8.0 vs 16.0" in message
    # Saving a run of another batch size into the directory is refused at once.
    ema = posthoc.trackers(batch_size=4)
    state = ema.update({"w": jnp.zeros(16)}, ema.init({"w": jnp.zeros(16)}))
    state = state._replace(step=jnp.asarray(50, jnp.int32))
    with (
        posthoc.Snapshots(tmp_path / "b", snapshot_every=10) as snapshots,
        pytest.raises(posthoc.SnapshotMismatchError, match=r"batch_size 16\.0 vs 4\.0"),
    ):
        snapshots.save(state, ema=ema, step=50)


@pytest.mark.bad_input
def test_snapshots_of_other_trackers_in_one_directory_are_refused(tmp_path):
    write_run(tmp_path / "a", steps=20, every=10)
    write_run(tmp_path / "b", steps=30, every=10, sigma_rels=(0.05, 0.15))
    shutil.copytree(tmp_path / "b" / "30", tmp_path / "a" / "30")
    with pytest.raises(posthoc.SnapshotMismatchError, match=r"averages \['0.05', '0.1'\]"):
        posthoc.reconstruct(tmp_path / "a", 0.07)


# --- a stale snapshot on resume -----------------------------------------------------------


@pytest.mark.bad_input
def test_one_stale_snapshot_after_the_restored_step_is_refused(tmp_path):
    # Run a: snapshots at 10, 20, 30; it is restored at step 20 and goes on with other
    # data, forgetting discard_after(20). Before: the abandoned run's step 30 was kept.
    write_run(tmp_path / "a", steps=30, every=10)
    _, state, params = write_run(tmp_path / "scratch", steps=20, every=1000)
    with pytest.raises(ValueError, match=r"snapshot at step 30 whose averages differ") as raised:
        write_run(tmp_path / "a", steps=40, every=10, seed=7, start=(20, state, params))
    assert "discard_after(<the restored step>)" in str(raised.value)
    with posthoc.Snapshots(tmp_path / "a", snapshot_every=10) as snapshots:
        assert snapshots.discard_after(20) == [30]
    write_run(tmp_path / "a", steps=40, every=10, seed=7, start=(20, state, params))
    assert [i.step for i in posthoc.list_snapshots(tmp_path / "a")] == [10, 20, 30, 40]


def test_a_deterministic_resume_keeps_the_identical_snapshot(tmp_path):
    # The same data after the restored step: the snapshot at 30 is this run's, kept.
    write_run(tmp_path / "a", steps=30, every=10)
    before = (tmp_path / "a" / "30").stat().st_mtime_ns
    _, state, params = write_run(tmp_path / "scratch", steps=20, every=1000)
    write_run(tmp_path / "a", steps=40, every=10, start=(20, state, params))
    assert (tmp_path / "a" / "30").stat().st_mtime_ns == before
    assert [i.step for i in posthoc.list_snapshots(tmp_path / "a")] == [10, 20, 30, 40]

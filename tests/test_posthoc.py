"""Post-hoc EMA: the math against the paper, reconstructions against directly tracked
averages (within the bound derived in tests/support/posthoc_bound.py), resume, and bad input."""

from __future__ import annotations

import itertools
import shutil
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from support import anchors
from support import posthoc_bound

import ema_jax
from ema_jax import posthoc
from ema_jax import schedules

TRACKED = (0.05, 0.10)
DIRECT = (0.03, 0.07, 0.15)  # tracked directly, reconstructed from TRACKED's snapshots
BATCH = 8
# How far below the gap to the nearest tracked average the bound must be, by
# (snapshots per average, target): the test would pass a wrong reconstruction otherwise.
# Extrapolating below the tracked widths needs more snapshots (docs/posthoc.md).
TEETH = {(20, 0.03): 0.3, (20, 0.07): 0.05, (20, 0.15): 0.05, (10, 0.07): 0.15, (10, 0.15): 0.15}


# --- the math ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("t_a", "g_a", "t_b", "g_b"),
    [
        (10.0, 6.94, 10.0, 16.97),
        (3.0, 6.94, 10.0, 16.97),
        (10.0, 2.0, 4.0, 0.5),
        (7.0, 1.0, 7.5, 30.0),
    ],
)
def test_profile_inner_product_is_the_integral_of_the_two_profiles(t_a, g_a, t_b, g_b):
    # Gauss-Legendre on (0, min(t_a, t_b)], where both profiles are nonzero: exact to
    # rounding for these smooth integrands.
    nodes, quad = np.polynomial.legendre.leggauss(400)
    top = min(t_a, t_b)
    tau = (nodes + 1) * top / 2

    def profile(t, g):
        return (g + 1) * tau**g / t ** (g + 1)

    integral = np.sum(quad * profile(t_a, g_a) * profile(t_b, g_b)) * top / 2
    assert posthoc.profile_inner(t_a, g_a, t_b, g_b) == pytest.approx(integral, rel=1e-12)
    assert anchors.edm2_profile_dot(t_a, g_a, t_b, g_b) == pytest.approx(integral, rel=1e-12)


@pytest.mark.parametrize("count", [5, 20, 50])
@pytest.mark.parametrize("target", [0.03, 0.07, 0.15, 0.25])
def test_weights_are_the_papers_algorithm_3(count, target):
    # Snapshots every 10 steps of 0.05 and 0.10 (update times (step - 1) + 1 = step).
    times = [float(10 * (i + 1)) for i in range(count)] * 2
    gammas = [schedules.gamma_of_sigma_rel(s) for s in TRACKED for _ in range(count)]
    gamma = schedules.gamma_of_sigma_rel(target)
    ours = posthoc.solve(times, gammas, time=times[-1], gamma=gamma)
    paper = anchors.edm2_posthoc_weights(times, gammas, times[-1], gamma)
    # The two solves differ in scaling and factorisation: they agree to cond * eps.
    scale = np.max(np.abs(paper))
    assert np.max(np.abs(ours.weights - paper)) <= 1e3 * ours.cond * 2.2e-16 * scale
    assert ours.weights.sum() == pytest.approx(1.0, abs=1e-12)
    assert ours.rank == 2 * count


def test_a_tracked_sigma_rel_at_a_snapshot_gets_all_the_weight():
    times = [10.0, 20.0, 30.0] * 2
    gammas = [schedules.gamma_of_sigma_rel(s) for s in TRACKED for _ in range(3)]
    solution = posthoc.solve(times, gammas, time=30.0, gamma=gammas[-1])
    np.testing.assert_allclose(solution.weights, [0, 0, 0, 0, 0, 1], atol=1e-9)
    assert solution.residual < 1e-6


def test_more_snapshots_fit_the_target_profile_better():
    residuals = []
    for count in (10, 20, 40, 80):
        times = [float(i + 1) for i in range(count)] * 2
        gammas = [schedules.gamma_of_sigma_rel(s) for s in TRACKED for _ in range(count)]
        gamma = schedules.gamma_of_sigma_rel(0.07)
        residuals.append(posthoc.solve(times, gammas, time=count, gamma=gamma).residual)
    assert all(a > 3 * b for a, b in itertools.pairwise(residuals))


@pytest.mark.parametrize(("update_period", "step"), [(1, 40), (4, 40), (4, 43), (7, 40)])
def test_a_snapshots_time_is_its_averages_last_update(update_period, step):
    schedule = schedules.power_function(
        sigma_rel=0.05, batch_size=BATCH, update_period=update_period
    )
    last = posthoc_bound.update_calls(schedule, step)[-1]
    assert posthoc._format.last_update_time(schedule, step) == (last + 1) * BATCH


# --- reconstruction against averages tracked directly -----------------------------------


def reconstruct_flagged(directory, found, **kwargs):
    """posthoc.reconstruct of ``found``'s widths, expecting a warning exactly for those whose
    residual is above WARN_RESIDUAL (0.03 from 10 or 20 snapshots per average)."""
    flagged = [c.sigma_rel for c in found if c.residual > posthoc.WARN_RESIDUAL]
    targets = [c.sigma_rel for c in found]
    if not flagged:
        return posthoc.reconstruct(directory, targets, **kwargs)
    with pytest.warns(posthoc.ExtrapolationWarning) as caught:
        results = posthoc.reconstruct(directory, targets, **kwargs)
    assert [str(w.message).split(" ")[0] for w in caught] == [f"sigma_rel={s:g}" for s in flagged]
    return results


def allowed(directory, sigma_rel, **kwargs):
    """posthoc.reconstruct with extrapolation allowed and its warnings ignored."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", posthoc.ExtrapolationWarning)
        return posthoc.reconstruct(directory, sigma_rel, allow_extrapolation=True, **kwargs)


def smooth_trajectory(steps: int, size: int = 48) -> np.ndarray:
    """theta(s) = a + b sin(2 pi f s + phi) + c s**2 with s = step / steps, float32."""
    rng = np.random.default_rng(0)
    a, b, f, phi, c = (rng.normal(size=size) for _ in range(5))
    s = np.arange(steps + 1)[:, None] / steps
    return (a + b * np.sin(2 * np.pi * 2 * np.abs(f) * s + phi) + c * s**2).astype(np.float32)


def random_walk(steps: int, size: int = 48) -> np.ndarray:
    rng = np.random.default_rng(1)
    return np.cumsum(rng.normal(scale=0.1, size=(steps + 1, size)), axis=0).astype(np.float32)


def run_with_snapshots(trajectory, directory, *, update_period, snapshot_every, dtype=None):
    """The trajectory through trackers and direct averages; the direct ones at each snapshot."""
    names = {f"{s:g}": s for s in TRACKED + DIRECT}
    pf = {
        n: schedules.power_function(sigma_rel=s, batch_size=BATCH, update_period=update_period)
        for n, s in names.items()
    }
    ema = ema_jax.ema(pf)
    update = jax.jit(ema.update, donate_argnums=1)
    state = ema.init({"w": jnp.asarray(trajectory[0])})
    direct = {}
    tracked = [f"{s:g}" for s in TRACKED]
    with posthoc.Snapshots(
        directory, snapshot_every=snapshot_every, dtype=dtype, which=tracked
    ) as snapshots:
        for i in range(len(trajectory) - 1):
            state = update({"w": jnp.asarray(trajectory[i + 1])}, state)
            if snapshots.save(state, ema=ema, step=i + 1):
                direct[i + 1] = {n: np.asarray(ema.average(state.ema, n)["w"]) for n in pf}
    return pf, direct


@pytest.mark.parametrize(
    ("kind", "update_period", "dtype"),
    [("smooth", 1, None), ("walk", 3, None), ("smooth", 4, "bfloat16")],
)
def test_reconstruction_matches_an_average_tracked_directly(tmp_path, kind, update_period, dtype):
    steps, every = 240, 12
    trajectory = (smooth_trajectory if kind == "smooth" else random_walk)(steps)
    pf, direct = run_with_snapshots(
        trajectory, tmp_path, update_period=update_period, snapshot_every=every, dtype=dtype
    )
    assert sorted(direct) == list(range(every, steps + 1, every))
    exact = trajectory.astype(np.float64)
    for step in (steps, steps // 2):  # the latest snapshot, and one in the middle
        found = posthoc.coefficients(tmp_path, list(DIRECT), step=step)
        results = reconstruct_flagged(tmp_path, found, step=step)
        for sigma_rel, result, coefficients in zip(DIRECT, results, found, strict=True):
            name = f"{sigma_rel:g}"
            tracked = direct[step][name]
            got = result["w"]
            assert got.dtype == np.float32 and coefficients.step == step
            bound, l1 = posthoc_bound.tolerance(
                coefficients, pf, pf[name], exact, got, storage=dtype
            )
            error = np.abs(got.astype(np.float64) - tracked)
            assert np.all(error <= bound), (sigma_rel, step, float(np.max(error / bound)))
            # The bound has teeth: well below the gap to the nearest tracked average.
            if dtype is None and (step // every, sigma_rel) in TEETH:
                gap = min(np.max(np.abs(direct[step][f"{s:g}"] - tracked)) for s in TRACKED)
                assert np.max(bound) < TEETH[step // every, sigma_rel] * gap
            # r is the profile residual binned by update: by Cauchy-Schwarz on (0, t],
            # ||r||_1 <= sqrt(t) ||r||_2 = residual * (gamma + 1) / sqrt(2 gamma + 1).
            gamma = coefficients.gamma
            assert l1 <= coefficients.residual * (gamma + 1) / np.sqrt(2 * gamma + 1) + 1e-7
            # And the sum itself: the weights times the stored snapshots, in float64.
            storage = jnp.dtype(dtype or "float32")
            stored = {
                (s, n): direct[s][n].astype(storage).astype(np.float64)
                for s, n in coefficients.sources
            }
            expected = sum(
                x * stored[src]
                for src, x in zip(coefficients.sources, coefficients.weights, strict=True)
            )
            np.testing.assert_allclose(got, expected, rtol=2**-23, atol=1e-12)


def test_list_snapshots_reports_the_averages_and_their_times(tmp_path):
    trajectory = smooth_trajectory(20)
    pf, _ = run_with_snapshots(
        trajectory, tmp_path, update_period=3, snapshot_every=10, dtype="bf16"
    )
    infos = posthoc.list_snapshots(tmp_path)
    assert [i.step for i in infos] == [10, 20]
    assert infos[0].dtype == "bfloat16"
    assert [a.name for a in infos[0].averages] == ["0.05", "0.1"]
    # Update calls 0, 3, 6, 9 before step 10: the last one saw (9 + 1) * BATCH samples.
    assert [a.time for a in infos[0].averages] == [10.0 * BATCH, 10.0 * BATCH]
    assert [a.time for a in infos[1].averages] == [19.0 * BATCH, 19.0 * BATCH]
    assert infos[1].averages[1].gamma == pf["0.1"].exponent
    assert infos[0].leaves == {"w": {"shape": [48], "dtype": "float32"}}


# --- resume -----------------------------------------------------------------------------


class Tiny(nn.Module):
    @nn.compact
    def __call__(self, x, train=True):
        x = nn.BatchNorm(use_running_average=not train, momentum=0.5)(nn.Dense(4)(x))
        return nn.Dense(2)(x)


def make_state():
    model = Tiny()
    variables = model.init(jax.random.key(0), jnp.ones((2, 3)), train=False)
    return ema_jax.EmaTrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        tx=optax.sgd(0.1),
        ema=posthoc.trackers(TRACKED, batch_size=BATCH, update_period=2),
    )


@jax.jit
def train_step(state, i):
    x = jnp.sin(jnp.arange(6.0).reshape(2, 3) + i)

    def loss(params):
        out, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats}, x, mutable=["batch_stats"]
        )
        return jnp.sum(out**2), updates["batch_stats"]

    grads, stats = jax.grad(loss, has_aux=True)(state.params)
    return state.apply_gradients(grads=grads, batch_stats=stats)


def train(state, snapshots, manager, start, stop):
    for i in range(start, stop):
        state = train_step(state, i)
        snapshots.save(state, step=i + 1)
        if (i + 1) % 10 == 0:
            ema_jax.save_checkpoint(manager, state)
    return state


def test_a_resumed_run_reconstructs_what_an_uninterrupted_one_does(tmp_path):
    def manager(name):
        return ocp.CheckpointManager(
            tmp_path / name,
            item_handlers=ocp.StandardCheckpointHandler(),
            options=ocp.CheckpointManagerOptions(create=True),
        )

    with manager("ckpt_a") as m, posthoc.Snapshots(tmp_path / "a", snapshot_every=5) as s:
        train(make_state(), s, m, 0, 30)
    # The second run dies after step 27; the checkpoint of step 20 is the newest.
    with manager("ckpt_b") as m, posthoc.Snapshots(tmp_path / "b", snapshot_every=5) as s:
        train(make_state(), s, m, 0, 27)
    with manager("ckpt_b") as m, posthoc.Snapshots(tmp_path / "b", snapshot_every=5) as s:
        state = ema_jax.restore_checkpoint(m, make_state())
        restored = int(state.ema_state.step)
        assert restored == 20
        with pytest.raises(ValueError, match="discard_after"):
            s.save(train_step(state, 20), step=21, force=True)  # 25 is still there
        assert s.discard_after(restored) == [25]
        train(state, s, m, restored, 30)
    for step in (20, 30):
        for a, b in zip(
            allowed(tmp_path / "a", [0.03, 0.07], step=step),
            allowed(tmp_path / "b", [0.03, 0.07], step=step),
            strict=True,
        ):
            jax.tree.map(np.testing.assert_array_equal, a, b)
    variables = allowed(tmp_path / "b", 0.07, like=make_state().ema_variables(0))
    assert set(variables) == {"params", "batch_stats"}
    make_state().apply_fn(variables, jnp.ones((2, 3)), train=False)


# --- bad input --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def snapshot_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("snapshots")
    run_with_snapshots(smooth_trajectory(20), directory, update_period=1, snapshot_every=10)
    return directory


@pytest.mark.bad_input
@pytest.mark.parametrize("sigma_rel", [0.0, -0.1, 0.29, float("nan"), True, "0.1", [], [0.1, 0.3]])
def test_sigma_rel_out_of_range_is_refused(snapshot_dir, sigma_rel):
    for call in (posthoc.reconstruct, posthoc.coefficients):
        with pytest.raises(ValueError, match="sigma_rel"):
            call(snapshot_dir, sigma_rel)


@pytest.mark.bad_input
def test_no_snapshots_is_a_snapshot_not_found_error(tmp_path):
    with pytest.raises(posthoc.SnapshotNotFoundError, match="not a directory"):
        posthoc.reconstruct(tmp_path / "missing", 0.07)
    with pytest.raises(posthoc.SnapshotNotFoundError, match="no finalized steps"):
        posthoc.coefficients(tmp_path, 0.07)
    assert issubclass(posthoc.SnapshotNotFoundError, FileNotFoundError)


@pytest.mark.bad_input
def test_a_training_checkpoint_is_not_a_snapshot(tmp_path):
    with ocp.CheckpointManager(tmp_path, item_handlers=ocp.StandardCheckpointHandler()) as m:
        ema_jax.save_checkpoint(m, make_state())
    with pytest.raises(posthoc.SnapshotNotFoundError, match="not a post-hoc snapshot"):
        posthoc.reconstruct(tmp_path, 0.07)


@pytest.mark.bad_input
@pytest.mark.parametrize("step", [15, 30, 0, -1])
def test_a_step_without_a_snapshot_is_named(snapshot_dir, step):
    error = posthoc.SnapshotNotFoundError if step >= 0 else ValueError
    with pytest.raises(error, match=r"step"):
        posthoc.reconstruct(snapshot_dir, 0.07, step=step)


@pytest.mark.bad_input
def test_snapshots_of_another_model_are_refused(tmp_path, snapshot_dir):
    other = {"w": jnp.zeros(5)}
    ema = posthoc.trackers(TRACKED, batch_size=BATCH)
    state = ema.update(other, ema.init(other))
    # Saving into a directory of another model's snapshots.
    shutil.copytree(snapshot_dir, tmp_path / "mixed")
    with (
        posthoc.Snapshots(tmp_path / "mixed", snapshot_every=1) as snapshots,
        pytest.raises(posthoc.SnapshotMismatchError, match="another model"),
    ):
        snapshots.save(state, ema=ema, force=True, step=1)
    # A directory that mixes two models (a step copied in from elsewhere).
    with posthoc.Snapshots(tmp_path / "other", snapshot_every=1) as snapshots:
        for _ in range(30):
            state = ema.update(other, state)
        snapshots.save(state, ema=ema, step=31)
    shutil.copytree(tmp_path / "other" / "31", tmp_path / "mixed" / "31")
    with pytest.raises(posthoc.SnapshotMismatchError, match="different models"):
        posthoc.reconstruct(tmp_path / "mixed", 0.07)
    # Reconstructing for another model's variables.
    with pytest.raises(posthoc.SnapshotMismatchError, match="another model"):
        posthoc.reconstruct(snapshot_dir, 0.07, like=other)
    assert issubclass(posthoc.SnapshotMismatchError, ValueError)


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda d: posthoc.Snapshots(d, snapshot_every=0), "snapshot_every"),
        (lambda d: posthoc.Snapshots(d, snapshot_every=2.5), "snapshot_every"),
        (lambda d: posthoc.Snapshots(d, snapshot_every=1, dtype="int8"), "dtype"),
        (lambda d: posthoc.Snapshots(d, snapshot_every=1, which="0.05"), "which"),
        (lambda d: posthoc.trackers((0.05,), batch_size=8), "two or more"),
        (lambda d: posthoc.trackers((0.05, 0.3), batch_size=8), "sigma_rels"),
        (lambda d: posthoc.trackers((0.05, 0.05), batch_size=8), "distinct"),
        (lambda d: posthoc.trackers(batch_size=0), "batch_size"),
        (lambda d: posthoc.solve([], [], time=1.0, gamma=1.0), "non-empty"),
        (lambda d: posthoc.solve([1.0, -2.0], [1.0, 1.0], time=1.0, gamma=1.0), "times"),
        (lambda d: posthoc.solve([1.0], [0.0], time=1.0, gamma=1.0), "gammas"),
        (lambda d: posthoc.solve([1.0], [1.0], time=1.0, gamma=1.0, rcond=-1), "rcond"),
    ],
)
def test_bad_settings_are_named(tmp_path, make, match):
    with pytest.raises(ValueError, match=match):
        make(tmp_path)


@pytest.mark.bad_input
def test_bad_saves_are_named(tmp_path):
    params = {"w": jnp.full(3, 1e5)}
    mixed = ema_jax.ema(
        {"pf": schedules.power_function(sigma_rel=0.05, batch_size=1), "c": schedules.constant(0.9)}
    )
    state = mixed.update(params, mixed.init(params))
    with (
        posthoc.Snapshots(tmp_path / "a", snapshot_every=1) as snapshots,
        pytest.raises(ValueError, match="'c' has a constant schedule"),
    ):
        snapshots.save(state, ema=mixed)
    with (
        posthoc.Snapshots(tmp_path / "b", snapshot_every=1, which=["pf", 0]) as twice,
        pytest.raises(ValueError, match="which must name distinct"),
    ):
        twice.save(state, ema=mixed)
    with posthoc.Snapshots(tmp_path / "d", snapshot_every=1, which=["pf"]) as snapshots:
        with pytest.raises(ValueError, match="step=2 but the state's EMA has made 1"):
            snapshots.save(state, ema=mixed, step=2, force=True)
        with pytest.raises(TypeError, match="ema="):
            snapshots.save(state)
        with pytest.raises(TypeError, match="EmaTrainState or an EmaState"):
            snapshots.save(params, ema=mixed)
    with (
        posthoc.Snapshots(
            tmp_path / "c", snapshot_every=1, dtype="float16", which=["pf"]
        ) as snapshots,
        pytest.raises(ValueError, match=r"\['w'\] beyond float16's range"),
    ):
        snapshots.save(state, ema=mixed)


@pytest.mark.bad_input
def test_a_damaged_snapshot_is_a_corrupt_checkpoint_error(tmp_path):
    trajectory = random_walk(20, size=4096)  # large enough for a data file of its own
    run_with_snapshots(trajectory, tmp_path, update_period=1, snapshot_every=10)
    path = max(
        (p for p in (tmp_path / "20").rglob("*") if p.parent.name == "d"),
        key=lambda p: p.stat().st_size,
    )
    data = bytearray(path.read_bytes())
    middle = slice(len(data) // 2 - 32, len(data) // 2 + 32)
    data[middle] = bytes(b ^ 0xFF for b in data[middle])
    path.write_bytes(bytes(data))
    allowed(tmp_path, 0.07, step=10)  # the intact step still reconstructs
    with pytest.raises(ema_jax.CorruptCheckpointError, match="snapshot step 20 in"):
        allowed(tmp_path, 0.07)

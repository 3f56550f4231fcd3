"""Every schedule against its anchor's transcription (tests/support/anchors.py) and closed forms.

Two levels: the per-call step size (float64 on both sides, so a tight relative
tolerance catches any off-by-one in the step indexing), and the jitted float32 EMA over
a few hundred calls against the anchor's float64 EMA (the tolerance of
``test_transform.fp32_tolerance``: each update rounds a few ulp of the largest value and
the blend only damps earlier errors).
"""

from __future__ import annotations

import ast
import inspect
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from support import anchors
from support import fp32_tolerance
from support import run_every_call
from support.models import PYCLS

import ema_jax
from ema_jax import schedules

from conftest import make_trajectory

ROOT = pathlib.Path(__file__).resolve().parents[1]
EPS32 = float(np.finfo(np.float32).eps)
CALLS = 300


def assert_runs_close(ours, theirs, atol):
    assert len(ours) == len(theirs)
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        for name in ("w", "b"):
            np.testing.assert_allclose(a[name], b[name], rtol=0, atol=atol, err_msg=f"call {i}")


def decays(schedule, calls=CALLS):
    """Our per-call decay ``1 - alpha`` (None where the call does not update)."""
    return [None if (a := schedule.alpha_at(i)) is None else 1.0 - a for i in range(calls)]


def assert_decays_equal(ours, theirs):
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert (a is None) == (b is None), f"call {i}: ours {a}, theirs {b}"
        if a is not None:
            assert a == pytest.approx(b, rel=1e-12, abs=1e-15), f"call {i}"


WARMUP_POWER = [
    dict(decay=0.9999, inv_gamma=1.0, power=2 / 3),
    dict(decay=0.99, inv_gamma=2.0, power=0.75, min_decay=0.5, update_after_step=7),
    dict(decay=0.95, inv_gamma=1.0, power=0.5, update_after_step=3),
]


@pytest.mark.parametrize("hyper", WARMUP_POWER)
def test_warmup_power_is_timm_and_diffusers_step_for_step(hyper):
    schedule = schedules.warmup_power(**hyper)
    timm = dict(
        decay=hyper["decay"],
        min_decay=hyper.get("min_decay", 0.0),
        update_after_step=hyper.get("update_after_step", 0),
        use_warmup=True,
        warmup_gamma=hyper["inv_gamma"],
        warmup_power=hyper["power"],
    )
    diffusers = dict(timm, use_ema_warmup=True, inv_gamma=hyper["inv_gamma"], power=hyper["power"])
    del diffusers["use_warmup"], diffusers["warmup_gamma"], diffusers["warmup_power"]
    assert_decays_equal(decays(schedule), [anchors.timm_decay(i, **timm) for i in range(CALLS)])
    assert_decays_equal(
        decays(schedule), [anchors.diffusers_decay(i, **diffusers) for i in range(CALLS)]
    )
    trajectory = make_trajectory(CALLS)
    ours = run_every_call(ema_jax.ema(schedule), trajectory)
    assert_runs_close(ours, anchors.timm_ema(trajectory, **timm), fp32_tolerance(trajectory))
    assert_runs_close(
        ours, anchors.diffusers_ema(trajectory, **diffusers), fp32_tolerance(trajectory)
    )


@pytest.mark.parametrize("update_period", [1, 4, 10])
def test_warmup_power_with_a_period_is_ema_pytorch(update_period):
    hyper = dict(decay=0.999, inv_gamma=1.0, power=2 / 3, update_after_step=5)
    schedule = schedules.warmup_power(**hyper, update_period=update_period)
    theirs = dict(
        beta=0.999,
        update_after_step=5,
        update_every=update_period,
        inv_gamma=1.0,
        power=2 / 3,
        min_value=0.0,
        float32_decay=False,
    )
    expected = [anchors.ema_pytorch_decay(i, **theirs) for i in range(CALLS)]
    assert_decays_equal(decays(schedule), expected)
    trajectory = make_trajectory(CALLS)
    ours = run_every_call(ema_jax.ema(schedule), trajectory)
    assert_runs_close(
        ours, anchors.ema_pytorch_ema(trajectory, **theirs), fp32_tolerance(trajectory)
    )


@pytest.mark.parametrize(
    "hyper", [dict(decay=0.999), dict(decay=0.99, update_after_step=4, min_decay=0.3)]
)
def test_tf_warmup_is_diffusers_default_step_for_step(hyper):
    schedule = schedules.tf_warmup(**hyper)
    expected = [anchors.diffusers_decay(i, **hyper) for i in range(CALLS)]
    assert_decays_equal(decays(schedule), expected)
    trajectory = make_trajectory(CALLS)
    ours = run_every_call(ema_jax.ema(schedule), trajectory)
    assert_runs_close(ours, anchors.diffusers_ema(trajectory, **hyper), fp32_tolerance(trajectory))


def test_tf_warmup_is_tensorflow_with_num_updates_equal_to_t():
    # TF's decay with num_updates = i is ours at every call after the first (which copies).
    ours = decays(schedules.tf_warmup(0.999))
    tf = [
        anchors.tf_decay(i, decay=0.999, num_updates_offset=0, float32_decay=False)
        for i in range(CALLS)
    ]
    assert ours[0] == 0.0
    assert_decays_equal(ours[1:], tf[1:])


@pytest.mark.parametrize("rampup_ratio", [0.05, None])
def test_halflife_is_edm_step_for_step(rampup_ratio):
    hyper = dict(batch_size=4, ema_halflife_kimg=0.2, ema_rampup_ratio=rampup_ratio)
    schedule = schedules.halflife(halflife_samples=200, batch_size=4, rampup_ratio=rampup_ratio)
    expected = [anchors.edm_beta(i, **hyper) for i in range(CALLS)]
    assert_decays_equal(decays(schedule), expected)
    trajectory = make_trajectory(CALLS)
    ours = run_every_call(ema_jax.ema(schedule), trajectory)
    assert_runs_close(ours, anchors.edm_ema(trajectory, **hyper), fp32_tolerance(trajectory))


@pytest.mark.parametrize("sigma_rel", [0.05, 0.10])
def test_power_function_is_edm2_with_period_1(sigma_rel):
    schedule = schedules.power_function(sigma_rel=sigma_rel, batch_size=8)
    gamma = anchors.gamma_from_sigma_rel(sigma_rel)
    assert schedule.exponent == pytest.approx(gamma, rel=1e-12)
    expected = [(1 - 1 / (i + 1)) ** (gamma + 1) for i in range(CALLS)]  # the form
    assert_decays_equal(decays(schedule), expected)
    trajectory = make_trajectory(CALLS)
    ours = run_every_call(ema_jax.ema(schedule), trajectory)
    theirs = anchors.edm2_power_ema(trajectory, gamma=gamma, batch_size=8)
    assert_runs_close(ours, theirs, fp32_tolerance(trajectory))


@pytest.mark.parametrize("update_period", [3, 10, 32])
def test_power_function_with_a_period_realises_the_power_profile(update_period):
    # With updates k steps apart, the average must still be sum_j w_j theta_j with
    # w_j ~ t_j**(gamma+1) - t_{j-1}**(gamma+1) at the update times: dt counts skipped steps.
    schedule = schedules.power_function(sigma_rel=0.05, batch_size=8, update_period=update_period)
    trajectory = make_trajectory(CALLS)
    final = run_every_call(ema_jax.ema(schedule), trajectory)[-1]
    calls = np.arange(0, CALLS, update_period)
    weights = anchors.power_function_weights((calls + 1) * 8.0, schedule.exponent)
    for name in ("w", "b"):
        values = np.stack([trajectory[i + 1][name].astype(np.float64) for i in calls])
        expected = np.tensordot(weights, values, axes=1)
        np.testing.assert_allclose(final[name], expected, rtol=0, atol=fp32_tolerance(trajectory))


def test_karras_ema_with_a_period_is_not_the_power_profile_but_ours_is():
    # ema-pytorch's KarrasEMA uses the one-step beta every k steps (tests/support/anchors.py):
    # its average weighs recent parameters far less than the profile it claims.
    k, gamma = 10, anchors.gamma_from_sigma_rel(0.05)
    trajectory = [{"w": np.array([float(i)]), "b": np.array([0.0])} for i in range(CALLS + 1)]
    karras = anchors.karras_ema(trajectory, gamma=gamma, update_every=k)[-1]["w"][0]
    ours = run_every_call(
        ema_jax.ema(schedules.power_function(gamma=gamma, batch_size=1, update_period=k)),
        trajectory,
    )[-1]["w"][0]
    calls = np.arange(0, CALLS, k)
    profile = float(np.dot(anchors.power_function_weights(calls + 1.0, gamma), calls + 1.0))
    assert ours == pytest.approx(profile, rel=1e-5)
    assert abs(karras - profile) > 0.1 * profile


def test_gamma_and_sigma_rel_round_trip():
    for sigma_rel in (0.01, 0.05, 0.10, 0.2):
        gamma = schedules.gamma_of_sigma_rel(sigma_rel)
        assert schedules.sigma_rel_of_gamma(gamma) == pytest.approx(sigma_rel, rel=1e-12)
    assert round(schedules.gamma_of_sigma_rel(0.05), 2) == 16.97
    assert round(schedules.gamma_of_sigma_rel(0.10), 2) == 6.94


@pytest.mark.parametrize("update_period", [1, 3])
def test_debiased_constant_is_the_zero_started_ema_divided_by_its_bias(update_period):
    decay = 0.9
    trajectory = make_trajectory(60)
    ema = ema_jax.ema(schedules.constant(decay, update_period=update_period, debias=True))
    ours = run_every_call(ema, trajectory)
    hidden = {n: np.zeros_like(trajectory[0][n], np.float64) for n in ("w", "b")}
    updates = 0
    for i, params in enumerate(trajectory[1:]):
        if i % update_period == 0:
            updates += 1
            for n in hidden:
                hidden[n] = decay * hidden[n] + (1 - decay) * params[n]
        for n in hidden:
            expected = hidden[n] / (1 - decay**updates)
            np.testing.assert_allclose(
                ours[i][n], expected, rtol=0, atol=fp32_tolerance(trajectory)
            )
    assert ema.schedule.alpha_at(0) == 1.0  # the first update copies


def test_debiased_constant_is_optax_and_haiku():
    trajectory = make_trajectory(CALLS)
    ours = run_every_call(ema_jax.ema(schedules.constant(0.99, debias=True)), trajectory)
    assert_runs_close(
        ours, anchors.optax_ema_debiased(trajectory, decay=0.99), fp32_tolerance(trajectory)
    )
    assert_runs_close(ours, anchors.haiku_ema(trajectory, decay=0.99), fp32_tolerance(trajectory))


def run_beside_nnx_ema(nonfinite: str) -> tuple[list, list, float]:
    """300 random steps of an nnx.Linear; nnx.EMA and ours on the same parameters."""
    from flax import nnx

    model = nnx.Linear(5, 4, rngs=nnx.Rngs(0))
    theirs = nnx.EMA(model, 0.999, only=nnx.Param)
    ours = ema_jax.ema(schedules.constant(0.999, form="nnx"), nonfinite=nonfinite)
    state = ours.init(nnx.to_pure_dict(nnx.state(model, nnx.Param)))

    @nnx.jit
    def step_theirs(model, ema, key):
        for _, p in nnx.iter_graph(model):
            if isinstance(p, nnx.Param):
                p[...] = p[...] + jax.random.normal(key, p.shape)
        ema.update(model)

    update = jax.jit(ours.update, donate_argnums=1)
    peak = 0.0
    for key in jax.random.split(jax.random.key(1), 300):
        step_theirs(model, theirs, key)
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        peak = max(peak, *(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(params)))
        state = update(params, state)
    expected = nnx.to_pure_dict(nnx.state(theirs.params))
    return jax.tree.leaves(state.ema), jax.tree.leaves(expected), peak


def test_constant_without_the_guard_is_bit_identical_to_flax_nnx_ema():
    ours, theirs, _ = run_beside_nnx_ema("propagate")  # nnx.EMA has no guard either
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_array_equal(a, b)


def test_constant_with_the_guard_is_nnx_ema_to_rounding():
    # XLA:CPU contracts nnx.EMA's blend into fma(decay, ema, (1 - decay) * p); with the
    # guard's select after it, it rounds the same blend differently (1 ulp): each update
    # may differ by an ulp of the largest value, and the blend only damps earlier ones.
    ours, theirs, peak = run_beside_nnx_ema("skip")
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=300 * EPS32 * peak)


def test_constant_matches_optax_incremental_update():
    trajectory = make_trajectory(CALLS)
    ours = run_every_call(ema_jax.ema(schedules.constant(0.98)), trajectory)
    theirs = anchors.optax_incremental_update_ema(trajectory, step_size=1 - 0.98)
    assert_runs_close(ours, theirs, fp32_tolerance(trajectory))


@pytest.mark.parametrize("update_period", [1, 7])
def test_fraction_of_training_halves_in_its_share_of_the_run(update_period):
    s = schedules.fraction_of_training(
        halflife_fraction=0.05, total_steps=10_000, update_period=update_period
    )
    alpha = s.alpha_at(update_period)  # an update after a full period
    assert (1 - alpha) ** (0.05 * 10_000 / update_period) == pytest.approx(0.5, rel=1e-12)
    assert s.alpha_at(0) == pytest.approx(1 - 0.5 ** (1 / 500), rel=1e-12)  # one step in
    report = ema_jax.explain(s)
    assert report.half_life_fraction == pytest.approx(0.05, rel=1e-12)


def test_normalized_ema_is_ema_of_the_pycls_schedule_bit_for_bit():
    hyper = dict(PYCLS)
    trajectory = make_trajectory(40)
    a = run_every_call(ema_jax.normalized_ema(**hyper), trajectory)
    b = run_every_call(
        ema_jax.ema(schedules.pycls(**hyper), nonfinite="skip_and_count"), trajectory
    )
    for x, y in zip(a, b, strict=True):
        jax.tree.map(np.testing.assert_array_equal, x, y)


def test_normalized_ema_defaults_are_the_pycls_schedules():
    ours = inspect.signature(ema_jax.normalized_ema).parameters
    for name, param in inspect.signature(schedules.pycls).parameters.items():
        assert ours[name].default == param.default, name


def test_a_run_of_a_step_dependent_schedule_compiles_once():
    ema = ema_jax.ema(schedules.warmup_power(update_after_step=3, update_period=2))
    update = jax.jit(ema.update, donate_argnums=1)
    state = ema.init({"w": jnp.zeros(3)})
    for i in range(20):
        state = update({"w": jnp.full(3, float(i))}, state)
    assert update._cache_size() == 1


CORE = [
    "ema_jax/_transform.py",
    "ema_jax/_trees.py",
    "ema_jax/_rounding.py",
    "ema_jax/_memory.py",
    *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "ema_jax" / "schedules").glob("*.py")),
]
ALLOWED = (
    "jax",
    "numpy",
    "optax",
    "ema_jax._validate",
    "ema_jax._trees",
    "ema_jax._rounding",
    "ema_jax._memory",
    "ema_jax.schedules",
    "__future__",
    "warnings",
    "dataclasses",
    "math",
    "typing",
    "numbers",
    "collections",
)


@pytest.mark.parametrize("path", CORE)
def test_the_jitted_core_imports_nothing_from_flax_orbax_or_diagnostics(path):
    tree = ast.parse((ROOT / path).read_text(encoding="utf-8"))
    names = []
    for node in tree.body:  # module level: what importing the core loads
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            names += [
                f"{module}.{alias.name}" if module == "ema_jax" else module for alias in node.names
            ]
    assert names and all(n.split(".")[0] in ALLOWED or n.startswith(ALLOWED) for n in names), names


BAD = [
    (lambda: schedules.constant(1.0), "decay must be a number in [0, 1), got 1.0"),
    (lambda: schedules.constant(-0.1), "decay must be a number in [0, 1), got -0.1"),
    (lambda: schedules.constant(0.9, update_period=0), "update_period must be an integer in [1"),
    (lambda: schedules.constant(0.9, debias=1), "debias must be a bool, got 1"),
    (lambda: schedules.warmup_power(decay=1.5), "decay must be a number in [0, 1), got 1.5"),
    (lambda: schedules.warmup_power(inv_gamma=0), "inv_gamma must be a finite number > 0, got 0"),
    (lambda: schedules.warmup_power(power=-1), "power must be a finite number > 0, got -1"),
    (
        lambda: schedules.warmup_power(decay=0.9, min_decay=0.95),
        "min_decay must be at most decay=0.9, got 0.95",
    ),
    (
        lambda: schedules.tf_warmup(0.99, update_after_step=-1),
        "update_after_step must be an integer in [0",
    ),
    (
        lambda: schedules.power_function(batch_size=8),
        "needs exactly one of sigma_rel and gamma, got sigma_rel=None and gamma=None",
    ),
    (
        lambda: schedules.power_function(sigma_rel=0.05, gamma=7.0, batch_size=8),
        "needs exactly one of sigma_rel and gamma, got sigma_rel=0.05 and gamma=7.0",
    ),
    (
        lambda: schedules.power_function(sigma_rel=0.3, batch_size=8),
        "sigma_rel must be below sqrt(1/12) = 0.288675 (gamma > 0), got 0.3",
    ),
    (
        lambda: schedules.power_function(gamma=0.0, batch_size=8),
        "gamma must be a finite number > 0, got 0.0",
    ),
    (
        lambda: schedules.power_function(gamma=7.0, batch_size=0),
        "batch_size must be a finite number > 0, got 0",
    ),
    (
        lambda: schedules.halflife(halflife_samples=-5, batch_size=8),
        "halflife_samples must be a finite number > 0, got -5",
    ),
    (
        lambda: schedules.halflife(halflife_samples=5, batch_size=8, rampup_ratio=0),
        "rampup_ratio must be a finite number > 0, got 0",
    ),
    (
        lambda: schedules.fraction_of_training(halflife_fraction=1.5, total_steps=10),
        "halflife_fraction must be a number in (0, 1], got 1.5",
    ),
    (
        lambda: schedules.fraction_of_training(halflife_fraction=0.0, total_steps=10),
        "halflife_fraction must be a number in (0, 1], got 0.0",
    ),
    (
        lambda: schedules.fraction_of_training(halflife_fraction=0.1, total_steps=0),
        "total_steps must be an integer in [1",
    ),
    (lambda: ema_jax.ema(0.999), "schedule must be a schedule from ema_jax.schedules"),
    (
        lambda: ema_jax.ema(schedules.constant(0.9), nonfinite="ignore"),
        "nonfinite must be one of ('skip', 'skip_and_count', 'propagate'), got 'ignore'",
    ),
]


@pytest.mark.bad_input
@pytest.mark.parametrize(("make", "message"), BAD, ids=[m[:40] for _, m in BAD])
def test_bad_schedule_arguments_are_named_at_construction(make, message):
    with pytest.raises((ValueError, TypeError), match=re_escape(message)):
        make()


def re_escape(text: str) -> str:
    import re

    return re.escape(text)


@pytest.mark.parametrize(
    "schedule",
    [  # every registered family but pycls (its own report), and variants
        *(cls.example() for cls in schedules.REGISTRY.values() if cls is not schedules.Pycls),
        schedules.constant(0.9, debias=True, update_period=4),
        schedules.warmup_power(update_after_step=10),
    ],
    ids=lambda s: s.name,
)
def test_explain_reports_every_schedule_from_its_own_formulas(schedule):
    report = ema_jax.explain(schedule, total_steps=getattr(schedule, "total_steps", None) or 5000)
    for step, alpha, h_steps, _, share in report.curve:
        assert alpha == schedule.alpha_at(step)
        expected = 0.0 if alpha == 1.0 else math.log(2) / -math.log1p(-alpha)
        assert h_steps == pytest.approx(expected * schedule.update_period, rel=1e-12)
        assert share == pytest.approx(h_steps / 5000, rel=1e-12)
    assert report.updates_total == -(-5000 // schedule.update_period)
    assert report.alpha_end == schedule.alpha_at(
        (report.updates_total - 1) * schedule.update_period
    )
    assert str(report).startswith(f"EMA of weights: schedule={schedule.name}")
    assert report.to_dict()["schedule"] == schedule.name


def test_explain_warns_about_the_two_weight_blend_at_high_decays():
    report = ema_jax.explain(schedules.constant(0.999999, form="nnx"))
    assert report.fixed_point_bias == pytest.approx(1e-6 / (1 - float(np.float32(0.999999))) - 1)
    assert [w for w in report.warnings if w.startswith("bias:")]
    assert not ema_jax.explain(schedules.constant(0.999, form="nnx")).warnings
    # The default lerp form has no fixed-point bias to report.
    default = ema_jax.explain(schedules.constant(0.999999))
    assert default.fixed_point_bias is None
    assert not [w for w in default.warnings if w.startswith("bias:")]

"""The schedule protocol: every family registered, its hooks' contract, and a family
written outside the package (examples/cosine_schedule.py) run end to end.

What holds for every family is tested by iterating ``schedules.REGISTRY`` with each
family's own ``example()``: a new family gets these tests by registering. The hooks are
checked against their host (float64) evaluation, and the outside family against a NumPy
closed form written here from its docstring's formula.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import pathlib
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ema_jax
from ema_jax import __main__ as cli
from ema_jax import schedules

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "cosine_schedule.py"
FAMILIES = sorted(schedules.REGISTRY)  # the package's own, at import


def test_every_family_the_package_exports_is_registered_and_has_a_readme_row():
    exported = {
        obj.name
        for name in schedules.__all__
        if isinstance(obj := getattr(schedules, name), type)
        and issubclass(obj, schedules.Schedule)
        and obj is not schedules.Schedule
    }
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert exported == set(FAMILIES)
    for name in FAMILIES:
        assert getattr(schedules, name) is schedules.REGISTRY[name]  # schedules.NAME(...)
        assert f"| `{name}(" in readme, f"README's table has no row for {name}"


@pytest.mark.parametrize("name", FAMILIES)
def test_each_family_builds_its_example_and_round_trips_its_settings(name):
    cls = schedules.REGISTRY[name]
    example = cls.example()
    assert type(example) is cls
    settings = example.settings()
    assert settings.pop("name") == name
    assert cls(**settings) == example
    json.dumps(example.settings(), allow_nan=False)


@pytest.mark.bad_input
@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("bad", [-1, 2.5, "4", True])
def test_update_period_is_checked_by_the_base_class_for_every_family(name, bad):
    example = schedules.REGISTRY[name].example()
    with pytest.raises(ValueError, match=re.escape("update_period must be an integer in [")):
        dataclasses.replace(example, update_period=bad)


def test_update_period_zero_turns_pycls_off_and_is_refused_elsewhere():
    for name in FAMILIES:
        cls = schedules.REGISTRY[name]
        if cls.min_update_period == 0:
            assert dataclasses.replace(cls.example(), update_period=0).alpha_at(0) is None
        else:
            with pytest.raises(ValueError, match="update_period must be an integer in \\[1"):
                dataclasses.replace(cls.example(), update_period=0)
    assert [n for n in FAMILIES if schedules.REGISTRY[n].min_update_period == 0] == ["pycls"]


def host_ema(schedule: schedules.Schedule, trajectory: np.ndarray) -> np.ndarray:
    """The EMA in float64, from the host hooks (``alpha_at``), call by call."""
    ema = trajectory[0].copy()  # init: the parameters before the first update
    for i, params in enumerate(trajectory[1:]):
        alpha = schedule.alpha_at(i)
        if alpha is not None:
            ema = ema + alpha * (params - ema)
    return ema


def jitted_ema(schedule: schedules.Schedule, trajectory: np.ndarray) -> np.ndarray:
    ema = ema_jax.ema(schedule, nonfinite="propagate")
    update = jax.jit(ema.update, donate_argnums=1)
    state = ema.init({"w": jnp.asarray(trajectory[0], jnp.float32)})
    for params in trajectory[1:]:
        state = update({"w": jnp.asarray(params, jnp.float32)}, state)
    assert update._cache_size() == 1  # the hooks trace once: i is a traced scalar
    return np.asarray(state.ema["w"], np.float64)


TRAJECTORY = np.random.default_rng(0).uniform(0.0, 1.0, size=(41, 8))


@pytest.mark.parametrize("name", FAMILIES)
def test_the_jitted_hooks_are_the_host_hooks_in_float32(name):
    schedule = dataclasses.replace(schedules.REGISTRY[name].example(), update_period=3)
    ours, host = jitted_ema(schedule, TRAJECTORY), host_ema(schedule, TRAJECTORY)
    # 40 float32 blends of values in [0, 1], each off by a few ulps: well inside 1e-5.
    np.testing.assert_allclose(ours, host, rtol=0, atol=1e-5)
    assert not np.allclose(host, TRAJECTORY[0], atol=1e-3)  # the EMA did move


@pytest.mark.parametrize("name", FAMILIES)
def test_static_alpha_is_the_fast_path_of_constant_step_sizes(name):
    schedule = schedules.REGISTRY[name].example()
    static = schedule.static_alpha
    alphas = {schedule.step_size(i, np) for i in range(1, 50)}
    if static is not None:
        assert type(schedule.step_size(7, jnp)) is float  # no traced value: a constant
        assert alphas == {static}


def test_the_former_hook_names_still_work_both_ways():
    @dataclasses.dataclass(frozen=True)
    class Legacy(schedules.Schedule):
        name = "legacy"
        update_period: int = 1

        def _alpha(self, i, xp):
            return 0.25

        def _copies(self, i, xp):
            return i == 0

    legacy = Legacy()
    assert legacy.step_size(3, np) == 0.25 and legacy.alpha_at(0) == 1.0
    assert legacy.alpha_at(3) == 0.25 and legacy.static_alpha == 0.25
    modern = schedules.constant(0.9, debias=True)
    assert modern._alpha(4, np) == modern.step_size(4, np)
    assert schedules.pycls(ema_alpha=1e-5, batch_size=128, max_epoch=200)._updates(32)

    @dataclasses.dataclass(frozen=True)
    class Nothing(schedules.Schedule):
        name = "nothing"
        update_period: int = 1

    with pytest.raises(NotImplementedError, match="Nothing must define step_size"):
        Nothing().alpha_at(0)


@pytest.mark.bad_input
def test_register_refuses_what_is_not_a_family():
    with pytest.raises(TypeError, match=r"subclass of ema_jax\.schedules\.Schedule"):
        schedules.register(dict)

    class NotADataclass(schedules.Schedule):
        name = "not_a_dataclass"

    with pytest.raises(TypeError, match="dataclass with an update_period field"):
        schedules.register(NotADataclass)

    @dataclasses.dataclass(frozen=True)
    class Impostor(schedules.Schedule):
        name = "pycls"
        update_period: int = 1

    with pytest.raises(ValueError, match="a schedule family named 'pycls' is already registered"):
        schedules.register(Impostor)
    assert schedules.REGISTRY["pycls"] is schedules.Pycls


# -- the family written outside the package -------------------------------------------


@pytest.fixture
def cosine():
    """examples/cosine_schedule.py, imported (which registers it), and unregistered after."""
    spec = importlib.util.spec_from_file_location("cosine_schedule", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["cosine_schedule"] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        schedules.REGISTRY.pop("cosine_decay", None)
        sys.modules.pop("cosine_schedule", None)


def cosine_alpha(i: np.ndarray, start: float, end: float, total: int) -> np.ndarray:
    """The docstring's formula, in NumPy: 1 - d(min(i, T) / T)."""
    t = np.minimum(i, total) / total
    return 1.0 - (end - (end - start) * (1.0 + np.cos(np.pi * t)) / 2.0)


def test_the_outside_family_registers_and_matches_its_closed_form(cosine):
    assert schedules.REGISTRY["cosine_decay"] is cosine.CosineDecay
    schedule = cosine.cosine_decay(
        decay_start=0.8, decay_end=0.99, total_steps=200, update_period=3
    )
    calls = 301
    params = np.random.default_rng(1).normal(size=(calls, 5))
    state_params = np.concatenate([np.zeros((1, 5)), params])
    # Closed form: after updates u at calls c_u, ema = sum_u w_u p_u (+ the initial
    # weight), w_u = a_u * prod_{v > u} (1 - a_v); call 0 copies (a = 1).
    updated = np.arange(0, calls, 3)
    a = cosine_alpha(updated, 0.8, 0.99, 200)
    a[0] = 1.0
    later = np.concatenate([np.cumprod((1.0 - a)[::-1])[::-1][1:], [1.0]])
    expected = (a * later) @ params[updated]
    ours = jitted_ema(schedule, state_params)
    # 101 float32 blends of values of size ~1: a few ulps each, well inside 2e-5.
    np.testing.assert_allclose(ours, expected, rtol=0, atol=2e-5)
    assert ema_jax.ema(schedule).alpha is None  # a step size per call: no static alpha


def test_explain_and_the_command_line_take_the_outside_family(cosine, capsys):
    schedule = cosine.CosineDecay.example()
    report = ema_jax.explain(schedule)
    assert isinstance(report, ema_jax.Report) and report.total_steps == schedule.total_steps
    for step, alpha, *_ in report.curve:
        expected = 1.0 if step == 0 else cosine_alpha(np.array(step), 0.9, 0.999, 10_000)
        assert alpha == pytest.approx(float(expected), rel=1e-12)
    last = cosine_alpha(np.array(9_999), 0.9, 0.999, 10_000)  # the run's last update
    assert report.alpha_end == pytest.approx(float(last), rel=1e-12)

    with pytest.raises(SystemExit):
        cli.main(["explain", "--help"])
    assert "cosine_decay" in capsys.readouterr().out
    assert (
        cli.main(["explain", "--schedule", "cosine_decay", "--total-steps", "10000", "--json"]) == 0
    )
    assert json.loads(capsys.readouterr().out) == report.to_dict()
    assert (
        cli.main(
            ["explain", "--schedule", "cosine_decay", "--decay-end", "0.99", "--total-steps", "500"]
        )
        == 0
    )
    assert "decay_end=0.99" in capsys.readouterr().out


def test_docs_schedules_md_shows_the_example_family_as_it_is():
    example = EXAMPLE.read_text(encoding="utf-8")
    family = example[example.index("@register") : example.index("cosine_decay = CosineDecay")]
    doc = (ROOT / "docs" / "schedules.md").read_text(encoding="utf-8")
    assert f"```python\n{family}cosine_decay = CosineDecay\n```" in doc


def test_the_example_script_runs(cosine, capsys):
    cosine.main()
    out = capsys.readouterr().out
    assert out.startswith("EMA of weights: schedule=cosine_decay")
    # The EMA of 0, 1, ..., 99 under alpha ~0.1 trails the last value by ~ (1 - a) / a = 9.
    assert re.search(r"after 100 calls: 89\.99", out)


# -- the command line: every family, its own fields ------------------------------------


def flags(schedule: schedules.Schedule) -> list[str]:
    args = ["--schedule", schedule.name]
    for name, value in schedule.settings().items():
        if name == "name" or value is None or value is False:
            continue
        args += [f"--{name.replace('_', '-')}"] + (
            [] if value is True else [repr(value).strip("'")]
        )
    return args


@pytest.mark.parametrize("name", FAMILIES)
def test_the_command_line_takes_each_family_from_its_own_fields(name, capsys):
    example = schedules.REGISTRY[name].example()
    assert cli.main(["explain", *flags(example), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == ema_jax.explain(example).to_dict()


def test_explain_help_lists_every_family_and_shows_choices_not_n(capsys):
    with pytest.raises(SystemExit):
        cli.main(["explain", "--help"])
    text = capsys.readouterr().out
    listing = text.split("schedules (--schedule NAME):")[1]
    assert {line.split()[0] for line in listing.strip().splitlines()} == set(FAMILIES)
    assert "--rule {linear,exact}" in text and "--rule N" not in text
    assert "--max-epoch X" in text and "--steps-per-epoch N" in text


# -- issue 21's smaller items -------------------------------------------------------


@pytest.mark.bad_input
@pytest.mark.parametrize("value", ["constant", "pycls", ("constant",)])
def test_a_schedule_name_is_named_whole_with_how_to_build_one(value):
    name = value if isinstance(value, str) else value[0]
    with pytest.raises(TypeError) as error:
        ema_jax.ema(value)
    assert f"got {name!r}" in str(error.value)
    assert f"schedules.{name}(...)" in str(error.value)


@pytest.mark.bad_input
def test_an_unknown_schedule_name_lists_the_families():
    with pytest.raises(
        TypeError, match=re.escape("got 'cosine'; a name is not a schedule, and the")
    ):
        ema_jax.ema("cosine")


def test_a_fractional_max_epoch_is_accepted_and_explain_says_so(capsys):
    schedule = schedules.pycls(ema_alpha=1e-5, batch_size=128, max_epoch=10.5)
    assert schedule.max_epoch == 10.5  # documented: the schedule's length in the alpha
    report = ema_jax.explain(schedule)
    assert [w for w in report.warnings if w.startswith("epochs: max_epoch=10.5")]
    whole = ema_jax.explain(ema_alpha=1e-5, batch_size=128, max_epoch=10.0, steps_per_epoch=100)
    assert not [w for w in whole.warnings if w.startswith("epochs:")]
    cli.main(["explain", "--ema-alpha", "1e-5", "--batch-size", "128", "--max-epoch", "2.5",
              "--steps-per-epoch", "100"])  # fmt: skip
    assert "epochs: max_epoch=2.5 is not a whole number" in capsys.readouterr().out
    assert "ends mid-epoch, after 250 steps" in "\n".join(
        ema_jax.explain(ema_alpha=1e-5, batch_size=128, max_epoch=2.5, steps_per_epoch=100).warnings
    )


@pytest.mark.bad_input
def test_linen_precise_batch_stats_points_an_nnx_model_to_the_nnx_function():
    from flax import nnx

    model = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
    with pytest.raises(
        TypeError, match=re.escape("use ema_jax.nnx.precise_batch_stats(model, batches)")
    ):
        ema_jax.precise_batch_stats(model, [jnp.ones((4, 2))])
    with pytest.raises(TypeError, match="missing 1 required positional argument: 'batches'"):
        ema_jax.precise_batch_stats(lambda *a, **k: None, {"batch_stats": {}})

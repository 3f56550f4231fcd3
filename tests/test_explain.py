"""`explain`: the numbers behind EMA hyperparameters, against closed forms and brute force."""

from __future__ import annotations

import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from support import pycls_reference

import ema_jax

LN2 = math.log(2.0)
IMAGENET = dict(ema_alpha=1e-5, batch_size=128, max_epoch=200, dataset_size=1_281_167)
CIFAR = dict(ema_alpha=2.5e-4, batch_size=128, max_epoch=100, dataset_size=50_000)
CIFAR_BEST = dict(ema_alpha=2.5e-4, batch_size=1024, warmup_epochs=5, dataset_size=50_000)


def test_imagenet_half_life_is_a_twentieth_of_training():
    # mission.md: about 5.4% of training, about 10.8 of 200 epochs.
    r = ema_jax.explain(**IMAGENET)
    assert (r.steps_per_epoch, r.updates_per_epoch) == (10009, 313)
    assert round(r.half_life_epochs, 1) == 10.8
    assert round(r.half_life_fraction, 3) == 0.054
    assert r.cadence_speedup == pytest.approx(313 * 32 / 10009)  # 0.07%
    assert r.warnings == ()


def test_cifar_cadence_restart_speeds_the_ema_up():
    # mission.md: 390 iterations, 13 updates, the EMA moves 416/390 = 6.7% faster.
    r = ema_jax.explain(**CIFAR)
    assert (r.steps_per_epoch, r.updates_per_epoch) == (390, 13)
    assert r.cadence_speedup == pytest.approx(416 / 390)
    assert round(r.cadence_speedup - 1, 3) == 0.067
    assert r.half_life_steps == pytest.approx(r.half_life_updates * 390 / 13)


@pytest.mark.parametrize(
    ("max_epoch", "linear", "exact", "rel_diff"),
    [(50, 0.16384, 0.15112, 0.084), (100, 0.08192, None, 0.042), (400, 0.02048, None, 0.010)],
)
def test_cifar_best_recipe_linear_error(max_epoch, linear, exact, rel_diff):
    # mission.md: 0.16384 against 0.15112, 8.4% too high (4.2% at 100 epochs, 1.0% at 400).
    r = ema_jax.explain(**CIFAR_BEST, max_epoch=max_epoch)
    assert r.alpha_linear == pytest.approx(linear, rel=1e-12)
    if exact is not None:
        assert round(r.alpha_exact, 5) == exact
    assert round(r.linear_vs_exact_rel_diff, 3) == rel_diff


def test_both_recipes_hold_the_same_nominal_fraction():
    for recipe in (IMAGENET, CIFAR):
        nominal = LN2 / (recipe["ema_alpha"] * recipe["dataset_size"])
        assert round(nominal, 3) in (0.054, 0.055)


CONFIGS = [
    dict(ema_alpha=1e-5, batch_size=128, max_epoch=200, steps_per_epoch=10009),
    dict(ema_alpha=2.5e-4, batch_size=1024, max_epoch=50, steps_per_epoch=48, rule="exact"),
    dict(ema_alpha=3e-4, batch_size=64, max_epoch=7.5, update_period=5, steps_per_epoch=101),
    dict(ema_alpha=1e-3, batch_size=256, max_epoch=10, update_period=1, dataset_size=60_000),
]


@pytest.mark.parametrize("config", CONFIGS)
def test_half_lives_follow_their_definitions(config):
    r = ema_jax.explain(**config)
    k, spe = r.update_period, r.steps_per_epoch
    assert r.alpha == (r.alpha_exact if r.rule == "exact" else r.alpha_linear)
    assert r.half_life_updates == pytest.approx(LN2 / -math.log1p(-r.alpha), rel=1e-12)
    assert (1 - r.alpha) ** r.half_life_updates == pytest.approx(0.5, rel=1e-9)
    per_update = spe / math.ceil(spe / k)
    assert r.half_life_steps == pytest.approx(r.half_life_updates * per_update, rel=1e-12)
    assert r.half_life_samples == pytest.approx(r.half_life_steps * r.batch_size, rel=1e-12)
    assert r.half_life_epochs == pytest.approx(r.half_life_steps / spe, rel=1e-12)
    assert r.half_life_fraction == pytest.approx(r.half_life_epochs / r.max_epoch, rel=1e-12)
    assert r.start_weight_at_end == pytest.approx((1 - r.alpha) ** r.updates_post_warmup)
    assert r.linear_vs_exact_rel_diff == pytest.approx(r.alpha_linear / r.alpha_exact - 1)


@pytest.mark.parametrize("batch_size", [32, 128, 1024, 8192])
@pytest.mark.parametrize("update_period", [1, 8, 32, 256])
def test_exact_rule_half_life_in_samples_ignores_batch_and_period(batch_size, update_period):
    r = ema_jax.explain(
        ema_alpha=2.5e-4,
        batch_size=batch_size,
        max_epoch=100,
        update_period=update_period,
        rule="exact",
    )
    assert r.half_life_samples == pytest.approx(LN2 / -math.log1p(-2.5e-6), rel=1e-9)
    assert r.half_life_samples == pytest.approx(r.half_life_samples_nominal, rel=2e-6)


def brute_force_updates(steps_per_epoch, update_period, max_epoch, warmup, cadence):
    """Counts the transform's (and pycls's) updates step by step: (all, after warmup)."""
    total = post = 0
    for i in range(math.floor(max_epoch * steps_per_epoch)):  # a partial epoch ends early
        cur_iter = i % steps_per_epoch if cadence == "epoch" else i
        if update_period and cur_iter % update_period == 0:
            total += 1
            post += i // steps_per_epoch >= warmup
    return total, post


@pytest.mark.parametrize(
    ("steps_per_epoch", "update_period", "max_epoch", "warmup"),
    [
        (390, 32, 100, 1),
        (48, 32, 50, 5),
        (64, 32, 3, 0),
        (7, 3, 2.5, 1),
        (5, 0, 4, 0),
        (3, 8, 6, 6),
    ],
)
@pytest.mark.parametrize("cadence", ["epoch", "run"])
def test_update_counts_match_brute_force(
    steps_per_epoch, update_period, max_epoch, warmup, cadence
):
    r = ema_jax.explain(
        ema_alpha=1e-4,
        batch_size=16,
        max_epoch=max_epoch,
        update_period=update_period,
        warmup_epochs=warmup,
        steps_per_epoch=steps_per_epoch,
        cadence=cadence,
    )
    expected = brute_force_updates(steps_per_epoch, update_period, max_epoch, warmup, cadence)
    assert (r.updates_total, r.updates_post_warmup) == expected


@pytest.mark.parametrize(
    ("steps_per_epoch", "update_period", "max_epoch", "warmup"),
    [(39, 4, 10, 1), (48, 32, 12, 5), (10, 3, 8, 0), (7, 7, 20, 19)],
)
def test_start_weight_at_end_matches_pycls_loop(steps_per_epoch, update_period, max_epoch, warmup):
    # The model is 1 until warmup ends and 0 after it: the final EMA is the start's share.
    hyper = dict(ema_alpha=2e-3, batch_size=8, max_epoch=max_epoch, update_period=update_period)
    steps = max_epoch * steps_per_epoch
    trajectory = [{"w": np.array(float(i < warmup * steps_per_epoch))} for i in range(-1, steps)]
    ema = pycls_reference.run(
        trajectory, steps_per_epoch=steps_per_epoch, warmup_epochs=warmup, **hyper
    )
    r = ema_jax.explain(**hyper, warmup_epochs=warmup, steps_per_epoch=steps_per_epoch)
    assert r.start_weight_at_end == pytest.approx(float(ema["w"]), rel=1e-9)


def test_steps_per_epoch_drops_the_last_partial_batch():
    assert ema_jax.explain(**CIFAR).steps_per_epoch == 50_000 // 128
    for steps in (390, 391):  # a loader that keeps the partial batch is fine too
        r = ema_jax.explain(**CIFAR, steps_per_epoch=steps)
        assert (r.steps_per_epoch, r.dataset_size) == (steps, 50_000)


JSON_KEYS = {
    "alpha",
    "alpha_linear",
    "alpha_exact",
    "updates_total",
    "half_life_updates",
    "half_life_steps",
    "half_life_samples",
    "half_life_epochs",
    "half_life_fraction",
    "linear_vs_exact_rel_diff",
    "clamped",
    "warnings",
}
NEED_EPOCH_LENGTH = {
    "updates_per_epoch",
    "updates_total",
    "updates_post_warmup",
    "cadence_speedup",
    "half_life_epochs",
    "half_life_fraction",
    "start_weight_at_end",
}


def test_to_dict_is_json_with_nulls_where_the_epoch_length_is_unknown():
    report = ema_jax.explain(ema_alpha=1e-5, batch_size=128, max_epoch=200)
    d = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert d.keys() >= JSON_KEYS
    assert {key for key, value in d.items() if value is None} == NEED_EPOCH_LENGTH | {
        "steps_per_epoch",
        "dataset_size",
    }
    assert isinstance(d["clamped"], bool) and d["warnings"] == []
    full = ema_jax.explain(**IMAGENET).to_dict()
    assert [key for key, value in full.items() if value is None] == []


@pytest.mark.parametrize(
    ("override", "updates", "off_because"),
    [(dict(ema_alpha=0.0), math.inf, "ema_alpha=0"), (dict(update_period=0), 0, "update_period=0")],
)
def test_an_ema_that_never_moves_has_no_half_life(override, updates, off_because):
    r = ema_jax.explain(**(CIFAR | override))
    assert r.alpha == 0.0 and r.half_life_updates == math.inf
    assert r.to_dict()["half_life_updates"] is None
    assert r.to_dict()["half_life_fraction"] is None
    assert any(w.startswith("EMA off") and off_because in w for w in r.warnings)


def test_a_clamped_alpha_copies_with_half_life_zero():
    r = ema_jax.explain(ema_alpha=2.5e-4, batch_size=4096, max_epoch=10, steps_per_epoch=12)
    assert r.clamped and r.alpha == 1.0
    assert r.half_life_updates == r.half_life_fraction == r.start_weight_at_end == 0.0


# (arguments, tag of the warning it triggers); each differs from CLEAN in one place.
CLEAN = dict(ema_alpha=2.5e-4, batch_size=128, max_epoch=100, steps_per_epoch=390)
WARNINGS = [
    (dict(ema_alpha=0.0), "EMA off"),
    (dict(update_period=0), "EMA off"),
    (dict(batch_size=1024, max_epoch=50), "approximation"),
    (dict(batch_size=4096, max_epoch=10), "clamp"),
    (dict(warmup_epochs=99), "half-life"),
    (dict(ema_alpha=1e-6, max_epoch=2), "half-life"),
    (dict(warmup_epochs=100), "warmup"),
    (dict(steps_per_epoch=48), "cadence"),  # pycls's cifar_best: 2 updates of 32 in 48 steps
    (dict(dtype="bfloat16", max_epoch=400), "dtype"),
    (dict(dtype="float16", ema_alpha=1e-5, max_epoch=200), "dtype"),
    # Issue 15: in bfloat16 CIFAR's alpha 0.01024 needs a 38% gap to register.
    (dict(dtype="bfloat16", ema_alpha=2.5e-4, batch_size=128, max_epoch=100), "dtype"),
]
TAGS = sorted({tag for _, tag in WARNINGS})


@pytest.mark.parametrize(("override", "tag"), WARNINGS)
def test_each_warning_fires_on_its_case(override, tag):
    warnings = ema_jax.explain(**(CLEAN | override)).warnings
    assert [w for w in warnings if w.startswith(tag + ":")], warnings


@pytest.mark.parametrize("config", [CLEAN, IMAGENET, CIFAR])
def test_a_sound_configuration_has_no_warnings(config):
    assert ema_jax.explain(**config).warnings == ()


def test_exact_rule_has_no_approximation_or_clamp_warning():
    r = ema_jax.explain(**(CLEAN | dict(batch_size=4096, max_epoch=10, rule="exact")))
    assert r.clamped and r.alpha < 1.0
    assert not [w for w in r.warnings if w.startswith(("approximation", "clamp"))]


def test_half_life_warning_names_the_share_of_the_start_weights():
    r = ema_jax.explain(**(CLEAN | dict(warmup_epochs=99)))
    (warning,) = [w for w in r.warnings if w.startswith("half-life")]
    assert r.start_weight_at_end > 0.5
    assert f"{r.start_weight_at_end:.1%}" in warning


def test_dtype_resolution_is_half_the_machine_epsilon():
    r = ema_jax.explain(**(CLEAN | dict(dtype=jnp.bfloat16)))
    assert r.dtype == "bfloat16" and r.dtype_eps == 2.0**-7
    assert r.min_registered_gap == pytest.approx(2.0**-8 / r.alpha)
    assert ema_jax.explain(**(CLEAN | dict(dtype="bf16"))).dtype == "bfloat16"


@pytest.mark.parametrize("e", [1.0, 1.25, 1.5, 1.9921875, -1.0, -1.75])  # all bfloat16
@pytest.mark.parametrize("direction", [1.0, -1.0])
def test_min_registered_gap_brackets_what_the_transform_rounds_away(e, direction):
    # alpha = 2**-10: below bfloat16's eps/2 = 2**-8, so the gap must exceed 4 * |ema|.
    ema = ema_jax.normalized_ema(
        ema_alpha=2.0**-10, batch_size=1, max_epoch=1, update_period=1, ema_dtype=jnp.bfloat16
    )
    gap = ema.explain(dtype="bfloat16").min_registered_gap
    assert gap == 4.0
    with pytest.warns(ema_jax.EmaPrecisionWarning, match=r"> 4 \* \|ema\|"):  # the same gap
        state = ema.init({"w": jnp.full((2,), e, jnp.float32)})
    params = {"w": jnp.asarray(e + direction * np.array([0.99 * gap / 2, 1.01 * gap]) * abs(e))}
    new = np.asarray(jax.jit(ema.update)(params, state).ema["w"])
    assert new[0] == e  # below half the gap: rounds away
    assert new[1] != e  # above the gap: registers


def test_normalized_ema_explain_is_explain_on_its_hyperparameters():
    ema = ema_jax.normalized_ema(
        ema_alpha=2.5e-4,
        batch_size=128,
        max_epoch=100,
        warmup_epochs=1,
        steps_per_epoch=390,
        ema_dtype=jnp.float32,
    )
    assert ema.explain() == ema_jax.explain(**CLEAN, warmup_epochs=1)
    assert ema.explain(dtype=jnp.bfloat16).dtype == "bfloat16"
    no_epochs = ema_jax.normalized_ema(ema_alpha=2.5e-4, batch_size=128, max_epoch=100)
    r = no_epochs.explain(dataset_size=50_000)
    assert r.cadence == "run" and r.cadence_speedup == 1.0
    assert r.updates_total == brute_force_updates(390, 32, 100, 0, "run")[0]


BAD = [
    # (override, argument named, value shown)
    (dict(ema_alpha=-1e-5), "ema_alpha", "-1e-05"),
    (dict(ema_alpha=float("nan")), "ema_alpha", "nan"),
    (dict(batch_size=0), "batch_size", "0"),
    (dict(max_epoch=float("inf")), "max_epoch", "inf"),
    (dict(update_period=2.5), "update_period", "2.5"),
    (dict(warmup_epochs=-1), "warmup_epochs", "-1"),
    (dict(steps_per_epoch=0), "steps_per_epoch", "0"),
    (dict(rule="cosine"), "rule", "'cosine'"),
]


@pytest.mark.parametrize(("override", "name", "shown"), BAD)
def test_bad_argument_has_the_message_of_normalized_ema(override, name, shown):
    good = dict(ema_alpha=1e-5, batch_size=128, max_epoch=200, steps_per_epoch=10)
    with pytest.raises(ValueError, match=re.escape(name)) as explained:
        ema_jax.explain(**(good | override))
    with pytest.raises(ValueError) as built:
        ema_jax.normalized_ema(**(good | override))
    assert str(explained.value) == str(built.value)
    assert shown in str(explained.value)


@pytest.mark.parametrize(
    ("override", "text"),
    [
        (dict(dataset_size=0), "dataset_size must be an integer"),
        (dict(dataset_size=100), "dataset_size=100 is smaller than batch_size=128"),
        (dict(dataset_size=50_000, steps_per_epoch=5), "expected 390 (last partial batch"),
        (dict(dtype="int8"), "dtype must be a floating dtype, got 'int8'"),
        (dict(dtype="no-such"), "dtype must be a floating dtype, got 'no-such'"),
        (dict(cadence="epochs"), "cadence must be one of"),
    ],
)
def test_bad_epoch_length_dtype_or_cadence_is_named(override, text):
    with pytest.raises(ValueError, match=re.escape(text)):
        ema_jax.explain(**(dict(ema_alpha=1e-5, batch_size=128, max_epoch=200) | override))


def test_str_is_a_table_with_every_half_life():
    text = str(ema_jax.explain(**CIFAR))
    for label in ("updates", "optimizer steps", "samples", "epochs", "share of training"):
        assert f"half-life, {label}" in text
    assert "warnings: none" in text
    assert "unknown" in str(ema_jax.explain(ema_alpha=1e-5, batch_size=128, max_epoch=200))

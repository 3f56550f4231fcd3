"""Closed-form checks of the anchor transcriptions in ``support/anchors.py``.

Small trajectories only: each check is a formula the anchor must satisfy (or the installed
flax/optax it transcribes), so a slip in a transcription's indexing shows up here.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from support import anchors


def _walk(steps: int, seed: int = 0, shape: tuple[int, ...] = (5,)) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return list(np.cumsum(rng.normal(size=(steps + 1, *shape)), axis=0))


def _geometric(thetas: list[np.ndarray], start: np.ndarray, decay: float) -> np.ndarray:
    """``decay**n * start + sum_j (1 - decay) * decay**(n - j) * thetas[j - 1]``."""
    n = len(thetas)
    out = decay**n * start
    for j, theta in enumerate(thetas, start=1):
        out = out + (1 - decay) * decay ** (n - j) * theta
    return out


DECAY = 0.9


@pytest.mark.parametrize(
    ("name", "run", "copies_first"),
    [
        ("timm, no step", lambda t: anchors.timm_ema(t, decay=DECAY, pass_step=False), False),
        ("tf, no num_updates", lambda t: anchors.tf_ema(t, decay=DECAY, num_updates_offset=None,
                                                        float32_decay=False), False),
        ("optax incremental_update",
         lambda t: anchors.optax_incremental_update_ema(t, step_size=1 - DECAY), False),
        ("nnx eager (float32)", lambda t: anchors.nnx_ema_float32(t, decay=DECAY), False),
        ("torch AveragedModel lerp",
         lambda t: anchors.torch_averaged_model_ema(t, decay=DECAY), True),
        ("torch AveragedModel avg_fn",
         lambda t: anchors.torch_averaged_model_ema(t, decay=DECAY, multi_avg_fn=False), True),
        ("diffusers, min_decay = decay",
         lambda t: anchors.diffusers_ema(t, decay=DECAY, min_decay=DECAY), True),
        ("timm, step, no warmup", lambda t: anchors.timm_ema(t, decay=DECAY), True),
    ],
)  # fmt: skip
def test_constant_decay_is_the_geometric_closed_form(name, run, copies_first):
    traj = _walk(12)
    out = run(traj)
    assert len(out) == 12
    tol = 1e-5 if "float32" in name else 1e-12
    for i, ema in enumerate(out):
        if copies_first:
            expected = _geometric(traj[2 : i + 2], traj[1], DECAY)
        else:
            expected = _geometric(traj[1 : i + 2], traj[0], DECAY)
        np.testing.assert_allclose(ema, expected, rtol=tol, atol=tol, err_msg=name)


def test_debiased_zero_init_emas_are_the_normalised_geometric_weights():
    traj = _walk(10)
    optax_out = anchors.optax_ema_debiased(traj, decay=DECAY)
    haiku_out = anchors.haiku_ema(traj, decay=DECAY)
    for i in range(10):
        weights = np.array([(1 - DECAY) * DECAY ** (i - j) for j in range(i + 1)])
        expected = np.tensordot(weights / weights.sum(), np.stack(traj[1 : i + 2]), axes=1)
        np.testing.assert_allclose(optax_out[i], expected, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(haiku_out[i], expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(haiku_out[0], traj[1], rtol=1e-15)


@pytest.mark.parametrize(("sigma_rel", "gamma"), [(0.05, 16.9722), (0.10, 6.9372)])
def test_gamma_and_sigma_rel_round_trip(sigma_rel, gamma):
    g = anchors.gamma_from_sigma_rel(sigma_rel)
    assert g == pytest.approx(gamma, abs=1e-4)
    assert anchors.sigma_rel_from_gamma(g) == pytest.approx(sigma_rel, rel=1e-12)


@pytest.mark.parametrize("gamma", [0.0, 1.5, 6.94, 16.97])
def test_power_function_recursion_matches_its_closed_form(gamma):
    rng = np.random.default_rng(1)
    times = np.cumsum(rng.integers(1, 50, size=30)).astype(float)
    values = rng.normal(size=(30, 4))
    assert anchors.power_function_recursion_error(times, gamma, values) < 1e-12
    weights = anchors.power_function_weights(times, gamma)
    assert weights.sum() == pytest.approx(1.0)
    if gamma == 0.0:  # gamma = 0: each sample weighted by the samples it stands for
        np.testing.assert_allclose(weights, np.diff(times, prepend=0.0) / times[-1])


def test_edm2_power_ema_is_the_power_function_average_of_its_updates():
    traj = _walk(12)
    out = anchors.edm2_power_ema(traj, gamma=3.0, batch_size=4, update_every=3)
    calls = [2, 5, 8, 11]  # (i + 1) % 3 == 0
    times = [4.0 * (i + 1) for i in calls]
    expected = np.tensordot(
        anchors.power_function_weights(times, 3.0), np.stack([traj[i + 1] for i in calls]), 1
    )
    np.testing.assert_allclose(out[11], expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(out[2], traj[3])  # the first update copies
    np.testing.assert_array_equal(out[1], traj[0])  # nothing before it


def test_karras_ema_is_the_power_function_with_t_one_step_late():
    traj = _walk(15)
    gamma = anchors.gamma_from_sigma_rel(0.10)
    out = anchors.karras_ema(traj, sigma_rel=0.10, update_every=1)
    times = np.arange(15) + 2.0  # call i uses t = i + 2
    expected = np.tensordot(anchors.power_function_weights(times, gamma), np.stack(traj[1:]), 1)
    np.testing.assert_allclose(out[-1], expected, rtol=1e-12, atol=1e-12)
    assert anchors.karras_ema_beta(5, gamma, update_every=5) == pytest.approx(
        (6 / 7) ** (gamma + 1)
    )
    assert anchors.karras_ema_beta(5, gamma, update_every=10) is None


def test_warmup_schedules_share_one_indexing():
    hyper = {"decay": 0.999, "min_decay": 0.1, "update_after_step": 3}
    for i in range(40):
        timm = anchors.timm_decay(i, use_warmup=True, warmup_power=0.75, **hyper)
        diffusers = anchors.diffusers_decay(i, use_ema_warmup=True, power=0.75, **hyper)
        ema_pytorch = anchors.ema_pytorch_decay(
            i, beta=0.999, min_value=0.1, update_after_step=3, update_every=1, power=0.75,
            float32_decay=False,
        )  # fmt: skip
        assert timm == diffusers == ema_pytorch
        assert (timm == 0.0) == (i <= 3)
    assert anchors.diffusers_decay(1) == 2 / 11  # (1 + step) / (10 + step), step = i
    assert anchors.ema_pytorch_decay(5, update_every=10) is None


def test_praxis_is_tensorflow_with_num_updates_after_the_step():
    traj = _walk(20)
    praxis = anchors.praxis_ema(traj, decay=0.95)
    tf = anchors.tf_ema(traj, decay=0.95, num_updates_offset=1)
    for a, b in zip(praxis, tf, strict=True):
        np.testing.assert_array_equal(a, b)
    assert anchors.tf_decay(0, decay=0.95) == float(np.float32(2) / np.float32(11))


def test_edm_copies_at_call_zero_then_uses_the_half_life():
    traj = _walk(6)
    out = anchors.edm_ema(traj, batch_size=8, ema_halflife_kimg=0.1, ema_rampup_ratio=None)
    beta = 0.5 ** (8 / 100)
    np.testing.assert_allclose(out[-1], _geometric(traj[1:], traj[0], beta), rtol=1e-12)
    ramped = anchors.edm_ema(traj, batch_size=8, ema_halflife_kimg=0.1)
    np.testing.assert_array_equal(ramped[0], traj[1])
    assert anchors.edm_beta(1, batch_size=8) == 0.5 ** (8 / (8 * 0.05))


def _nnx_emas(traj: list[np.ndarray], decay: float, jit: bool) -> list[np.ndarray]:
    class Model(nnx.Module):
        def __init__(self, w):
            self.w = nnx.Param(jnp.asarray(w))

    model = Model(traj[0])
    ema = nnx.EMA(model, decay=decay)

    def step(ema, model):
        ema.update(model)

    update = nnx.jit(step) if jit else step
    out = []
    for w in traj[1:]:
        model.w[...] = jnp.asarray(w)
        update(ema, model)
        out.append(np.asarray(ema.params["w"][...]))
    return out


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "nnx.jit"])
@pytest.mark.parametrize("decay", [0.7, 0.999])
def test_nnx_float32_transcription_is_bitwise_flax(decay, jit):
    traj = [w.astype(np.float32) for w in _walk(15, shape=(200,))]
    expected = anchors.nnx_ema_float32(traj, decay=decay, fused=jit)
    for got, want in zip(_nnx_emas(traj, decay, jit), expected, strict=True):
        np.testing.assert_array_equal(got, want)


def test_optax_transcriptions_match_installed_optax():
    traj = [w.astype(np.float32) for w in _walk(10)]
    old, state = jnp.asarray(traj[0]), optax.ema(DECAY).init(jnp.asarray(traj[0]))
    inc = anchors.optax_incremental_update_ema(traj, step_size=0.2)
    deb = anchors.optax_ema_debiased(traj, decay=DECAY)
    for i, w in enumerate(traj[1:]):
        old = optax.incremental_update(jnp.asarray(w), old, 0.2)
        out, state = optax.ema(DECAY).update(jnp.asarray(w), state)
        np.testing.assert_allclose(np.asarray(old), inc[i], rtol=2e-6, atol=2e-6)
        np.testing.assert_allclose(np.asarray(out), deb[i], rtol=2e-6, atol=2e-6)


def test_integer_leaves_follow_each_anchor():
    traj = [{"w": np.full(2, float(k)), "n": np.array([10 * k, -10 * k], np.int32)}
            for k in range(4)]  # fmt: skip
    assert anchors.timm_ema(traj)[-1]["n"].tolist() == [30, -30]  # copied
    assert anchors.ema_pytorch_ema(traj)[-1]["n"].tolist() == [0, 0]  # never touched
    assert anchors.nnx_ema_float32(traj, decay=0.9)[0]["n"].tolist() == [1, -1]  # blended
    with pytest.raises(TypeError, match="half, float, or double"):
        anchors.tf_ema(traj, decay=0.9)

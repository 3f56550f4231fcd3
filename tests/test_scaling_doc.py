"""The numbers in docs/scaling.md, recomputed."""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import ema_jax

DOC = (Path(__file__).parent.parent / "docs" / "scaling.md").read_text()
PARAMS, CHIPS = 7e9, 256


@pytest.mark.parametrize(
    ("bytes_per_param", "per_model_gb", "per_chip_mb"),
    [(2, "14", "54.69"), (4, "28", "109.38"), (8, "56", "218.75")],
    ids=["bf16", "fp32", "adam-moments"],
)
def test_memory_table(bytes_per_param, per_model_gb, per_chip_mb):
    assert f"{PARAMS * bytes_per_param / 1e9:g}" == per_model_gb
    assert f"{PARAMS * bytes_per_param / CHIPS / 1e6:.2f}" == per_chip_mb
    assert f"| {per_model_gb} | {per_chip_mb} |" in DOC


def test_update_traffic():
    per_update = PARAMS * (2 + 4 + 4) / CHIPS / 1e6  # read bf16 p and fp32 EMA, write EMA
    assert f"{per_update:.2f} MB per chip" in DOC
    assert f"{per_update / 32:.2f} MB per chip per step" in DOC


def test_bf16_spacing_and_the_frozen_ema():
    spacing = float(jnp.finfo(jnp.bfloat16).eps)  # between 1 and the next bf16 number
    assert f"{spacing:.4f} apart" in DOC and f"{spacing / 2:.4f},\n  rounds" in DOC
    below, above = (jnp.float32(1 + spacing / 2 * f) for f in (0.99, 1.01))
    assert below.astype(jnp.bfloat16) == 1 and above.astype(jnp.bfloat16) > 1
    kwargs = dict(ema_alpha=1e-5, batch_size=128, max_epoch=200, update_period=32)
    frozen = ema_jax.normalized_ema(**kwargs)
    assert f"alpha = {frozen.alpha:.7f}" in DOC
    start, target = {"w": jnp.ones(3, jnp.bfloat16)}, {"w": jnp.full(3, 1.5, jnp.bfloat16)}
    assert "ema_jax.EmaPrecisionWarning" in DOC and 'rounding="stochastic"' in DOC
    with pytest.warns(ema_jax.EmaPrecisionWarning):
        state = frozen.update(target, frozen.init(start))
    np.testing.assert_array_equal(np.asarray(state.ema["w"], np.float32), 1.0)
    fp32 = ema_jax.normalized_ema(**kwargs, ema_dtype=jnp.float32)
    moved = float(fp32.update(target, fp32.init(start)).ema["w"][0])
    assert f"moves to {moved:.7f}" in DOC

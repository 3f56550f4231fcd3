"""Bad input to `normalized_ema` fails early, in Python, naming the argument and value."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ema_jax

GOOD = dict(ema_alpha=1e-5, batch_size=128, max_epoch=200)

BAD_HYPERPARAMETERS = [
    # (override, argument named, value shown)
    (dict(ema_alpha=-1e-5), "ema_alpha", "-1e-05"),
    (dict(ema_alpha=float("nan")), "ema_alpha", "nan"),
    (dict(ema_alpha=float("inf")), "ema_alpha", "inf"),
    (dict(ema_alpha="1e-5"), "ema_alpha", "'1e-5'"),
    (dict(batch_size=0), "batch_size", "0"),
    (dict(batch_size=-128), "batch_size", "-128"),
    (dict(batch_size=None), "batch_size", "None"),
    (dict(batch_size=True), "batch_size", "True"),
    (dict(max_epoch=0), "max_epoch", "0"),
    (dict(max_epoch=float("inf")), "max_epoch", "inf"),
    (dict(update_period=-1), "update_period", "-1"),
    (dict(update_period=2.5), "update_period", "2.5"),
    (dict(update_period=2**31), "update_period", "2147483648"),
    (dict(warmup_epochs=-1, steps_per_epoch=10), "warmup_epochs", "-1"),
    (dict(warmup_epochs=2), "warmup_epochs", "2"),  # no steps_per_epoch
    (dict(steps_per_epoch=0), "steps_per_epoch", "0"),
    (dict(steps_per_epoch=3.0), "steps_per_epoch", "3.0"),
    (dict(rule="cosine"), "rule", "'cosine'"),
    (dict(ema_dtype=jnp.int32), "ema_dtype", "int32"),
    (dict(ema_dtype="not-a-dtype"), "ema_dtype", "'not-a-dtype'"),
    (dict(skip_nonfinite="yes"), "skip_nonfinite", "'yes'"),
]


@pytest.mark.parametrize(("override", "name", "shown"), BAD_HYPERPARAMETERS)
def test_bad_hyperparameter_is_named_with_its_value(override, name, shown):
    with pytest.raises(ValueError, match=re.escape(name)) as info:
        ema_jax.normalized_ema(**(GOOD | override))
    assert shown in str(info.value)


def test_hyperparameters_are_keyword_only():
    with pytest.raises(TypeError):
        ema_jax.normalized_ema(1e-5, 128, 200)  # type: ignore[misc]


EMA = ema_jax.normalized_ema(**GOOD)
STATE = EMA.init({"dense": {"w": jnp.zeros((2, 3)), "b": jnp.zeros(3)}, "n": jnp.zeros((), int)})

BAD_PARAMS = [
    # (params, text in the message)
    (
        {"dense": {"w": jnp.zeros((2, 3))}, "n": jnp.zeros((), int)},
        "params lacks the EMA's leaf ema['dense']['b']",
    ),
    (
        {
            "dense": {"w": jnp.zeros((2, 3)), "b": jnp.zeros(3), "c": jnp.zeros(1)},
            "n": jnp.zeros((), int),
        },
        "params['dense']['c'] has no EMA leaf",
    ),
    (
        {"dense": {"w": jnp.zeros((3, 2)), "b": jnp.zeros(3)}, "n": jnp.zeros((), int)},
        "params['dense']['w'] has shape (3, 2)",
    ),
    (
        {"dense": {"w": jnp.zeros((2, 3)), "b": jnp.zeros(3)}, "n": jnp.zeros(())},
        "params['n'] has dtype float32",
    ),
    (
        {"dense": {"w": jnp.zeros((2, 3), int), "b": jnp.zeros(3)}, "n": jnp.zeros((), int)},
        "params['dense']['w'] has dtype int32",
    ),
    (
        {"other": {"w": jnp.zeros((2, 3)), "b": jnp.zeros(3)}, "n": jnp.zeros((), int)},
        "params lacks the EMA's leaf ema['dense']['b']",
    ),
]


@pytest.mark.parametrize(("params", "text"), BAD_PARAMS)
@pytest.mark.parametrize("jit", [True, False])
def test_params_that_do_not_fit_the_ema_name_the_first_difference(params, text, jit):
    update = jax.jit(EMA.update) if jit else EMA.update
    with pytest.raises(ValueError, match=re.escape(text)):
        update(params, STATE)


@pytest.mark.parametrize(
    ("params", "text"),
    [
        ({"a": "x"}, "params['a'] must be a numeric array, got str"),
        ({"a": [1.0, object()]}, "params['a'][1] must be a numeric array, got object"),
        ({"a": np.array(["x"])}, "params['a'] must be a numeric array, got ndarray"),
    ],
)
def test_init_refuses_leaves_that_are_not_numeric_arrays(params, text):
    with pytest.raises(TypeError, match=re.escape(text)):
        EMA.init(params)


def test_update_with_arguments_swapped_says_so():
    with pytest.raises(TypeError, match=re.escape("the order is update(params, state)")):
        EMA.update(STATE, STATE.ema)

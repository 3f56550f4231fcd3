"""README.md's Python snippets run as written, given the names they assume."""

from __future__ import annotations

import re
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp

README = Path(__file__).parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


class BnModel(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        return nn.Dense(3)(nn.BatchNorm(use_running_average=not train)(nn.Dense(8)(x)))


def test_api_and_train_state_snippets_run(tmp_path):
    model = BnModel()
    x, y = jnp.ones((4, 5)), jnp.zeros((4, 3))
    variables = model.init(jax.random.key(0), x)
    namespace = {
        "model": model,
        "variables": variables,
        "params": variables["params"],
        "x": x,
        "y": y,
        "loss": lambda out, y: jnp.mean((out - y) ** 2),
        "workdir": tmp_path,
    }
    blocks = python_blocks()
    assert len(blocks) >= 3  # the API, the train state, checkpoints
    # Imports the later blocks take for granted.
    exec("import functools, jax, optax, ema_jax", namespace)
    for block in blocks:
        exec(block, namespace)
    assert int(namespace["state"].step) == 0  # the checkpoint block restored step 0
    assert namespace["logits"].shape == (4, 3)
    state = namespace["train_step"](namespace["state"], x, y)
    assert int(state.step) == int(state.ema_state.step) == 1

"""README.md's Python snippets run as written, given the names they assume."""

from __future__ import annotations

import re
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

README = Path(__file__).parent.parent / "README.md"


def python_blocks(nnx_blocks: bool = False) -> list[str]:
    """The linen blocks (one namespace, in order), or the NNX ones (their own)."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    return [b for b in blocks if ("from flax import nnx" in b) == nnx_blocks]


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


class NnxModel(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.lin = nnx.Linear(5, 8, rngs=rngs)
        self.bn = nnx.BatchNorm(8, rngs=rngs)
        self.out = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out(self.bn(self.lin(x)))


def test_nnx_snippets_run(tmp_path):
    x, y = jnp.ones((4, 5)), jnp.zeros((4, 3))
    namespace = {
        "Model": NnxModel,
        "x": x,
        "y": y,
        "loss": lambda out, y: jnp.mean((out - y) ** 2),
        "workdir": tmp_path,
    }
    blocks = python_blocks(nnx_blocks=True)
    assert len(blocks) == 2  # the Ema, its checkpoints
    exec("import jax, optax, ema_jax", namespace)
    for block in blocks:
        exec(block, namespace)
    assert namespace["step"] == 0  # the checkpoint block restored step 0
    assert namespace["logits"].shape == (4, 3)
    model, optimizer, ema = (namespace[k] for k in ("model", "optimizer", "ema"))
    namespace["train_step"](model, optimizer, ema, x, y)
    assert int(ema.ema_state.step) == 1
    # The view follows the update: it holds the EMA's variables.
    assert namespace["ema_model"].lin.kernel is ema.params["lin"]["kernel"]

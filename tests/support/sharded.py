"""Sharded training setups shared by the sharding and multi-host workers.

Importing this module starts nothing: the workers choose the devices (through
``XLA_FLAGS`` and ``jax.distributed``) before they build a mesh from it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import ema_jax

BATCH = 16
IN, HIDDEN, OUT = 8, 32, 16
COLLECTIVE_RE = re.compile(
    r"\s(all-gather|all-reduce|reduce-scatter|collective-permute|all-to-all|"
    r"collective-broadcast|ragged-all-to-all)(?:-start)?\("
)


class ShardNet(nn.Module):
    """Dense -> BatchNorm -> relu -> Dense, every dimension divisible by 8."""

    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        x = nn.Dense(HIDDEN, param_dtype=self.param_dtype)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, param_dtype=self.param_dtype)(
            x
        )
        return nn.Dense(OUT, param_dtype=self.param_dtype)(nn.relu(x))


class PlainState(train_state.TrainState):
    """The same train state without an EMA: the baseline for communication and memory."""

    batch_stats: Any = None


Rule = Callable[[str, tuple[int, ...]], P]


def _replicated(path: str, shape: tuple[int, ...]) -> P:
    return P()


def _fsdp(path: str, shape: tuple[int, ...]) -> P:
    """Each leaf sharded over "data" on its largest dimension that 8 divides."""
    dims = [d for d in np.argsort(shape)[::-1] if shape[d] % 8 == 0]
    if not dims:
        return P()
    # No trailing None: jit's cache tells P("data", None) from P("data"), and
    # outputs come back in the short spelling, so the long one compiles twice.
    return P(*[None] * int(dims[0]), "data")


def _tensor_parallel(path: str, shape: tuple[int, ...]) -> P:
    """Kernels split over "model" on their output dimension, vectors with them."""
    if len(shape) == 2:
        return P(None, "model")
    if len(shape) == 1:
        return P("model")
    return P()


def _mixed(path: str, shape: tuple[int, ...]) -> P:
    """One 2-D sharded kernel, one row-split kernel, replicated biases, split BN.

    Dense_0's bias is kept replicated although its gradient comes out split over
    "model": the case where the train step must constrain the gradients.
    """
    if "Dense_0']['kernel" in path:
        return P("data", "model")
    if "Dense_1']['kernel" in path:
        return P("model")
    if "BatchNorm_0" in path:
        return P("model")
    return P()


class Layout(NamedTuple):
    """A mesh shape, how parameter-like leaves are sharded on it, and the batch's spec."""

    mesh_shape: tuple[int, ...]
    axis_names: tuple[str, ...]
    rule: Rule
    batch_spec: P


LAYOUTS: dict[str, Layout] = {
    "replicated": Layout((8,), ("data",), _replicated, P()),
    "data_parallel": Layout((8,), ("data",), _replicated, P("data")),
    "fsdp": Layout((8,), ("data",), _fsdp, P("data")),
    "tensor_parallel": Layout((2, 4), ("data", "model"), _tensor_parallel, P("data")),
    "mixed": Layout((2, 4), ("data", "model"), _mixed, P("data")),
}


def make_mesh(
    layout: Layout, shape: tuple[int, ...] | None = None, devices: Any = None
) -> jax.sharding.Mesh:
    """The layout's mesh (or one of another ``shape``) with Auto axes, flax's usual."""
    return jax.make_mesh(
        layout.mesh_shape if shape is None else shape,
        layout.axis_names,
        axis_types=(AxisType.Auto,) * len(layout.axis_names),
        devices=devices,
    )


def shardings_for(tree: Any, mesh: jax.sharding.Mesh, rule: Rule) -> Any:
    """A NamedSharding per leaf from the rule; scalars (step counters) are replicated."""

    def one(path: Any, leaf: Any) -> NamedSharding:
        shape = tuple(leaf.shape)
        spec = rule(jax.tree_util.keystr(path), shape) if shape else P()
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(one, tree)


def make_ema(**kwargs: Any) -> ema_jax.NormalizedEma:
    defaults = dict(ema_alpha=0.05, batch_size=BATCH, max_epoch=2, update_period=1)
    return ema_jax.normalized_ema(**(defaults | kwargs))


def create_state(
    ema: ema_jax.NormalizedEma | None, param_dtype: Any = jnp.float32, seed: int = 0
) -> Any:
    """A fresh train state (EmaTrainState, or PlainState when ``ema`` is None)."""
    model = ShardNet(param_dtype=param_dtype)
    variables = model.init(jax.random.key(seed), jnp.ones((2, IN)))
    tx = optax.sgd(0.1, momentum=0.9)
    common = dict(apply_fn=model.apply, params=variables["params"], tx=tx)
    if ema is None:
        return PlainState.create(**common, batch_stats=variables["batch_stats"])
    return ema_jax.EmaTrainState.create(**common, ema=ema, batch_stats=variables["batch_stats"])


def sharded_state(
    ema: ema_jax.NormalizedEma | None,
    mesh: jax.sharding.Mesh,
    rule: Rule,
    param_dtype: Any = jnp.float32,
) -> Any:
    """The state created under jit, every leaf placed by ``rule`` (the documented way)."""

    def create() -> Any:
        return create_state(ema, param_dtype)

    out = shardings_for(jax.eval_shape(create), mesh, rule)
    return jax.jit(create, out_shardings=out)()


def make_train_step(param_shardings: Any = None) -> Callable[..., Any]:
    """A train step (squared loss, BatchNorm statistics updated), to be jitted.

    With ``param_shardings``, the gradients are constrained to the parameters'
    shardings, so that the optimizer and the EMA update run in the layout the
    parameters are stored in (see docs/scaling.md).
    """

    def train_step(state: Any, x: jax.Array, y: jax.Array) -> tuple[Any, jax.Array]:
        def loss_fn(params: Any) -> tuple[jax.Array, Any]:
            variables = {"params": params, "batch_stats": state.batch_stats}
            out, updates = state.apply_fn(variables, x, train=True, mutable=["batch_stats"])
            return jnp.mean((out - y) ** 2), updates["batch_stats"]

        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        if param_shardings is not None:
            grads = jax.lax.with_sharding_constraint(grads, param_shardings)
        return state.apply_gradients(grads=grads, batch_stats=stats), loss

    return train_step


train_step = make_train_step()


def numpy_batch(step: int) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and targets of batch ``step``, the same in every process."""
    rng = np.random.default_rng(step)
    x = rng.normal(size=(BATCH, IN)).astype(np.float32)
    y = (0.1 * rng.normal(size=(BATCH, OUT))).astype(np.float32)
    return x, y


def global_batch(step: int, mesh: jax.sharding.Mesh, spec: P) -> tuple[jax.Array, ...]:
    """Batch ``step`` as global arrays; each process fills only its own shards."""
    sharding = NamedSharding(mesh, spec)
    return tuple(
        jax.make_array_from_callback(a.shape, sharding, lambda idx, a=a: a[idx])
        for a in numpy_batch(step)
    )


def collectives(hlo_text: str) -> list[str]:
    """The collective ops in optimized HLO text, one entry per op."""
    return COLLECTIVE_RE.findall(hlo_text)


def abstract_like(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of ``tree``'s leaves with the given shardings: a restore target.

    ``shardings`` needs the same leaves in the same order, not the same static fields.
    """
    leaves = [
        jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
        for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings), strict=True)
    ]
    return jax.tree.unflatten(jax.tree.structure(tree), leaves)


def params_and_ema_pairs(state: ema_jax.EmaTrainState) -> list[tuple[str, Any, Any]]:
    """(path, source leaf, EMA leaf) for params and batch_stats."""
    source = {"params": state.params, "batch_stats": state.batch_stats}
    flat_src = jax.tree_util.tree_flatten_with_path(source)[0]
    flat_ema = jax.tree.leaves(dict(state.ema_state.ema))
    return [
        (jax.tree_util.keystr(path), s, e) for (path, s), e in zip(flat_src, flat_ema, strict=True)
    ]

"""What the benchmark runs: parameter trees, the small ResNet train step, the peers."""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

import ema_jax

PyTree = Any
RESNET50_PARAMS = 25_557_032


def resnet50_shapes() -> dict[str, tuple[int, ...]]:
    """The 161 parameter shapes of ResNet-50 (53 convs, 53 BatchNorms, the classifier)."""
    shapes: dict[str, tuple[int, ...]] = {}

    def conv_bn(name: str, k: int, cin: int, cout: int) -> None:
        shapes[f"{name}/kernel"] = (k, k, cin, cout)
        shapes[f"{name}_bn/scale"] = (cout,)
        shapes[f"{name}_bn/bias"] = (cout,)

    conv_bn("stem", 7, 3, 64)
    cin = 64
    for s, (blocks, width) in enumerate(zip([3, 4, 6, 3], [64, 128, 256, 512], strict=True)):
        for b in range(blocks):
            conv_bn(f"s{s}b{b}/c1", 1, cin, width)
            conv_bn(f"s{s}b{b}/c2", 3, width, width)
            conv_bn(f"s{s}b{b}/c3", 1, width, 4 * width)
            if b == 0:
                conv_bn(f"s{s}b{b}/proj", 1, cin, 4 * width)
            cin = 4 * width
    shapes["fc/kernel"] = (2048, 1000)
    shapes["fc/bias"] = (1000,)
    return shapes


def param_tree(total: int | None = None, dtype: Any = jnp.float32, seed: int = 0) -> PyTree:
    """ResNet-50's 161 leaves; with ``total``, flat leaves of the same relative sizes."""
    rng = np.random.default_rng(seed)
    shapes = resnet50_shapes()
    if total is not None:
        scale = total / RESNET50_PARAMS
        shapes = {k: (max(1, round(int(np.prod(s)) * scale)),) for k, s in shapes.items()}
    return {
        k: jnp.asarray(rng.standard_normal(s, dtype=np.float32), dtype) for k, s in shapes.items()
    }


def tree_bytes(tree: PyTree) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(tree))


def copy_tree(tree: PyTree, dtype: Any = None) -> PyTree:
    return jax.tree.map(lambda x: jnp.array(x, dtype=dtype, copy=True), tree)


# ---------------------------------------------------------------- the train step (item 3)


class _Block(nn.Module):
    features: int
    strides: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9)
        y = nn.Conv(self.features, (3, 3), self.strides, use_bias=False)(x)
        y = nn.relu(norm()(y))
        y = nn.Conv(self.features, (3, 3), use_bias=False)(y)
        y = norm(scale_init=nn.initializers.zeros)(y)
        if x.shape != y.shape:
            x = nn.Conv(self.features, (1, 1), self.strides, use_bias=False)(x)
            x = norm()(x)
        return nn.relu(x + y)


class SmallResNet(nn.Module):
    """A CIFAR-style ResNet: a stem, three stages of two basic blocks, BatchNorm."""

    widths: tuple[int, ...] = (32, 64, 128)
    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        x = nn.Conv(self.widths[0], (3, 3), use_bias=False)(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
        for i, width in enumerate(self.widths):
            x = _Block(width, 1 if i == 0 else 2)(x, train)
            x = _Block(width)(x, train)
        return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


class PlainState(train_state.TrainState):
    """flax's TrainState plus BatchNorm statistics: the baseline without EMA."""

    batch_stats: PyTree = None


def make_train_states(
    model: nn.Module, x: jax.Array, emas: dict[str, ema_jax.NormalizedEma]
) -> dict[str, Any]:
    """The plain state and one EmaTrainState per EMA, all from the same initial weights."""
    variables = model.init(jax.random.key(0), x)
    tx = optax.sgd(0.1, momentum=0.9)
    states: dict[str, Any] = {
        "plain": PlainState.create(
            apply_fn=model.apply,
            params=copy_tree(variables["params"]),
            tx=tx,
            batch_stats=copy_tree(variables["batch_stats"]),
        ).replace(step=jnp.zeros((), jnp.int32))
    }
    for name, ema in emas.items():
        states[name] = ema_jax.EmaTrainState.create(
            apply_fn=model.apply,
            params=copy_tree(variables["params"]),
            tx=tx,
            ema=ema,
            batch_stats=copy_tree(variables["batch_stats"]),
        )
    return states


def train_step(state: Any, x: jax.Array, y: jax.Array) -> Any:
    """One SGD-momentum step on softmax cross-entropy; returns the new state."""

    def loss_fn(params: PyTree) -> tuple[jax.Array, PyTree]:
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats},
            x,
            train=True,
            mutable=["batch_stats"],
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, updates["batch_stats"]

    grads, stats = jax.grad(loss_fn, has_aux=True)(state.params)
    if isinstance(state, ema_jax.EmaTrainState):
        return state.apply_gradients(grads=grads, batch_stats=stats)
    return state.apply_gradients(grads=grads).replace(batch_stats=stats)


# ---------------------------------------------------------------- peers (item 5)


def numpy_inplace_blend(alpha: float, chunk: int = 1 << 16) -> Any:
    """In-place ``e += alpha * (p - e)`` in NumPy, chunked so the temporary stays in L2."""
    scratch = np.empty(chunk, np.float32)

    def step(state: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        e, p = state
        for lo in range(0, e.size, chunk):
            hi = min(lo + chunk, e.size)
            t = scratch[: hi - lo]
            np.subtract(p[lo:hi], e[lo:hi], out=t)
            t *= alpha
            e[lo:hi] += t
        return e, p

    return step


def torch_peers(alpha: float) -> dict[str, Any] | None:
    """timm's ModelEmaV3 (``torch._foreach_lerp_``) and pycls's per-tensor loop, or None."""
    try:
        import torch
    except ImportError:
        return None

    @torch.no_grad()
    def foreach_lerp(state: tuple[list, list, int]) -> tuple[list, list, int]:
        ema, params, _ = state
        torch._foreach_lerp_(ema, params, alpha)
        return state

    @torch.no_grad()
    def pycls_loop(state: tuple[list, list, int]) -> tuple[list, list, int]:
        # pycls/core/net.py update_model_ema: param.copy_(param * (1 - alpha) + p * alpha)
        ema, params, _ = state
        for e, p in zip(ema, params, strict=True):
            e.copy_(e * (1 - alpha) + p * alpha)
        return state

    def to_torch(tree: PyTree) -> list:
        return [torch.from_numpy(np.array(x)) for x in jax.tree.leaves(tree)]

    return {
        "torch": torch,
        "foreach_lerp": foreach_lerp,
        "pycls_loop": pycls_loop,
        "to_torch": to_torch,
        "version": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def optax_incremental(alpha: float) -> Any:
    """``optax.incremental_update`` jitted without donation: a fresh EMA every call."""
    return jax.jit(lambda p, e: optax.incremental_update(p, e, alpha))


def where_every_step(alpha: float, period: int) -> Any:
    """A naive period: the blend is computed every step and selected with ``jnp.where``."""

    def update(p: PyTree, state: tuple[PyTree, jax.Array]) -> tuple[PyTree, jax.Array]:
        ema, step = state
        do = step % period == 0
        ema = jax.tree.map(lambda e, q: jnp.where(do, e + alpha * (q - e), e), ema, p)
        return ema, step + 1

    return jax.jit(update, donate_argnums=1)

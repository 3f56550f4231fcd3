"""One configuration of the invariance sweep: every seed and every EMA in one jitted pass.

The digits CNN (GroupNorm instead of BatchNorm, see ``Cnn``) trains with SGD at a high
learning rate; one ``ema_jax.ema({name: schedule})`` keeps all the averages on a
trailing axis, and every epoch evaluates the raw weights and each average on the test
split. Seeds run side by side under ``jax.vmap``, the steps of an epoch under
``lax.scan``.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import ema_jax
from ema_jax import schedules

UPDATE_PERIOD = 1  # every optimizer step: no per-epoch cadence effect at any batch size
WARMUP_EPOCHS = 1  # learning-rate warmup; the EMA copies the weights through it (pycls)
WARMUP_FACTOR = 0.1  # the learning rate starts at this share of its value (pycls)
REFERENCE_BATCH = 32  # the learning rate is base_lr at this batch, scaled linearly
MOMENTUM = 0.9


def load_data() -> tuple[np.ndarray, ...]:
    """The 1797 8x8 digits shipped with scikit-learn, split 75/25 (stratified, fixed)."""
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[..., None]  # NHWC, in [0, 1]
    labels = digits.target.astype(np.int32)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=0.25, random_state=0, stratify=labels
    )
    return x_train, y_train, x_test, y_test


class PatchConv(nn.Module):
    """A 3x3 "SAME" convolution without bias, as patches times a matrix.

    The same function as ``nn.Conv(features, (3, 3), use_bias=False)`` (same kernel
    shape and initializer), written so that ``jax.vmap`` over the weights (seeds,
    averages) becomes a batched matrix product: vmapped ``lax.conv`` becomes a grouped
    convolution, which XLA:CPU runs many times slower.
    """

    features: int
    strides: int = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shape = (3, 3, x.shape[-1], self.features)
        kernel = self.param("kernel", nn.initializers.lecun_normal(), shape)
        dims = ("NHWC", "HWIO", "NHWC")
        s = (self.strides, self.strides)
        patches = jax.lax.conv_general_dilated_patches(x, (3, 3), s, "SAME", dimension_numbers=dims)
        # Patches are channel-major: (C, kh, kw) flattened.
        return patches @ kernel.transpose(2, 0, 1, 3).reshape(-1, self.features)


class Cnn(nn.Module):
    """Two conv + GroupNorm blocks, global average pooling, a linear classifier.

    GroupNorm, not the example's BatchNorm: it keeps the normalization (and so the
    high learning rate) but holds no running statistics, so every average is a pure
    average of weights, evaluated as it is, with no precise-BN pass per average.
    """

    width: int = 16

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for features, strides in ((self.width, 1), (2 * self.width, 2)):
            x = PatchConv(features, strides)(x)
            x = nn.GroupNorm(num_groups=4)(x)
            x = nn.relu(x)
        return nn.Dense(10)(x.mean(axis=(1, 2)))


@dataclasses.dataclass(frozen=True)
class Config:
    """One cell of the sweep: batch size n and schedule length m (epochs)."""

    batch_size: int
    epochs: int

    @property
    def name(self) -> str:
        return f"n{self.batch_size}_m{self.epochs}"


def learning_rate(base_lr: float, batch_size: int) -> float:
    """The linear scaling rule (Goyal et al., 2017): ``base_lr * n / REFERENCE_BATCH``."""
    return base_lr * batch_size / REFERENCE_BATCH


def averages(
    config: Config, steps_per_epoch: int, ema_alphas: list[float], decays: list[float]
) -> dict[str, schedules.Schedule]:
    """The named schedules of one run: pycls linear and exact per ema_alpha, constant per decay."""
    out: dict[str, schedules.Schedule] = {}
    for rule in ("linear", "exact"):
        for a in ema_alphas:
            out[f"{rule}:{a:.6g}"] = schedules.pycls(
                ema_alpha=a,
                batch_size=config.batch_size,
                max_epoch=config.epochs,
                update_period=UPDATE_PERIOD,
                warmup_epochs=WARMUP_EPOCHS,
                steps_per_epoch=steps_per_epoch,
                rule=rule,
            )
    for d in decays:
        out[f"constant:{d:.6g}"] = schedules.constant(d, update_period=UPDATE_PERIOD)
    return out


def half_life_fractions(
    named: dict[str, schedules.Schedule], total_steps: int, dataset_size: int
) -> dict[str, float | None]:
    """Each average's half-life as a share of training, from ``ema_jax.explain``."""
    out: dict[str, float | None] = {}
    for name, s in named.items():
        if isinstance(s, schedules.Pycls):
            report = ema_jax.explain(s, dataset_size=dataset_size)
        else:
            report = ema_jax.explain(s, total_steps=total_steps)
        out[name] = report.half_life_fraction
    return out


def run_config(
    config: Config,
    seeds: list[int],
    ema_alphas: list[float],
    decays: list[float],
    base_lr: float,
    data: tuple[np.ndarray, ...],
    weight_decay: float,
) -> dict[str, Any]:
    """Trains every seed of one configuration; test accuracy of each EMA after every epoch.

    Returns ``{"names": [...], "correct": int array (seed, epoch, 1 + K)}`` (column 0:
    the raw weights), the half-life shares, the step counts and the wall time.
    """
    x_train, y_train, x_test, y_test = data
    n, m = config.batch_size, config.epochs
    spe = len(x_train) // n  # the last partial batch dropped, as pycls's loader
    named = averages(config, spe, ema_alphas, decays)
    ema = ema_jax.ema(named)
    model = Cnn()
    lr = learning_rate(base_lr, n)
    sched = optax.warmup_constant_schedule(WARMUP_FACTOR * lr, lr, WARMUP_EPOCHS * spe)
    tx = optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(sched, momentum=MOMENTUM))

    def init(key: jax.Array) -> tuple[Any, ...]:
        params = model.init(key, jnp.ones((1, 8, 8, 1)))["params"]
        return params, tx.init(params), ema.init(params)

    def loss_fn(params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
        logits = model.apply({"params": params}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def step(carry: tuple[Any, ...], idx: jax.Array) -> tuple[tuple[Any, ...], None]:
        params, opt, es = carry
        grads = jax.grad(loss_fn)(params, xs[idx], ys[idx])
        updates, opt = tx.update(grads, opt, params)
        params = optax.apply_updates(params, updates)
        return (params, opt, ema.update(params, es)), None

    def epoch(carry: tuple[Any, ...], order: jax.Array, restart: jax.Array) -> tuple[Any, ...]:
        carry, _ = jax.lax.scan(step, carry, order)
        params, opt, es = carry
        # The end of warmup: every average restarts from the weights (pycls copies them
        # through warmup; its schedules do so already, the constant ones do not).
        copied = jax.tree.map(lambda p, e: jnp.broadcast_to(p[..., None], e.shape), params, es.ema)
        ema_tree = jax.tree.map(lambda c, e: jnp.where(restart, c, e), copied, es.ema)
        return params, opt, es._replace(ema=ema_tree)

    def evaluate(params: Any, es: Any) -> jax.Array:
        stacked = jax.tree.map(
            lambda p, e: jnp.concatenate([p[None], jnp.moveaxis(e, -1, 0)]), params, es.ema
        )
        logits = jax.vmap(lambda p: model.apply({"params": p}, xt))(stacked)
        return jnp.sum(jnp.argmax(logits, -1) == yt, axis=-1)  # (1 + K,) correct

    xs, ys = jnp.asarray(x_train), jnp.asarray(y_train)
    xt, yt = jnp.asarray(x_test), jnp.asarray(y_test)
    init_v = jax.jit(jax.vmap(init))
    epoch_v = jax.jit(jax.vmap(epoch, in_axes=(0, 0, None)), donate_argnums=0)
    eval_v = jax.jit(jax.vmap(evaluate))

    start = time.perf_counter()
    carry = init_v(jnp.stack([jax.random.key(s) for s in seeds]))
    correct = []
    for e in range(m):
        # The data order depends only on (seed, epoch).
        order = np.stack(
            [
                np.random.default_rng([s, e]).permutation(len(x_train))[: spe * n].reshape(spe, n)
                for s in seeds
            ]
        )
        carry = epoch_v(carry, order, jnp.asarray(e + 1 == WARMUP_EPOCHS))
        correct.append(eval_v(carry[0], carry[2]))
    correct_np = np.stack(jax.device_get(correct), axis=1).astype(int)  # (seed, epoch, 1+K)
    wall = time.perf_counter() - start
    return {
        "names": list(named),
        "correct": correct_np,
        "half_life_fraction": half_life_fractions(named, m * spe, len(x_train)),
        "steps_per_epoch": spe,
        "learning_rate": lr,
        "wall_s": wall,
    }

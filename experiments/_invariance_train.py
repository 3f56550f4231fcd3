"""One configuration of the invariance sweep: every seed and every EMA in one jitted pass.

Two settings (``SETTINGS``): pycls's own recipe (BatchNorm, precise statistics for
every average, per-epoch cosine learning rate with pycls's warmup, Nesterov momentum)
and the first sweep's (GroupNorm, constant learning rate after a linear warmup). The
digits CNN trains with SGD; one ``ema_jax.ema({name: schedule})`` keeps every
scheduled average on a trailing axis, and each BEMA setting (``ema_jax.bema``, a
transform of its own) runs beside it. After the last epoch the raw weights and every
average are evaluated on the test split (BatchNorm: with pycls's precise statistics
recomputed for each, ``ema_jax.precise_batch_stats``). Seeds run side by side under
``jax.vmap``, the steps of an epoch under ``lax.scan``.
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

from _invariance_families import Context
from _invariance_families import build_all
from _invariance_families import half_life_fraction

UPDATE_PERIOD = 1  # every optimizer step: no per-epoch cadence effect at any batch size
WARMUP_EPOCHS = 1  # learning-rate warmup; the EMA copies the weights through it (pycls)
WARMUP_FACTOR = 0.1  # the learning rate starts at this share of its value (pycls)
REFERENCE_BATCH = 32  # the learning rate is base_lr at this batch, scaled linearly
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4  # pycls's OPTIM.WEIGHT_DECAY: keeps the raw weights noisy to the end
EVAL_CHUNK = 32  # models evaluated at once (bounds the evaluation's memory)


@dataclasses.dataclass(frozen=True)
class Setting:
    """How the runs of one sweep train: normalization, learning-rate policy, optimizer."""

    name: str
    title: str
    norm: str  # "batch" (BatchNorm, precise statistics per average) or "group"
    lr_policy: str  # "cos" (pycls, per epoch) or "constant" (after a linear warmup)
    base_lr: float  # at REFERENCE_BATCH
    nesterov: bool


SETTINGS = {
    "bn_cos": Setting(
        "bn_cos",
        "BatchNorm with precise statistics, cosine learning rate (pycls's recipe)",
        norm="batch",
        lr_policy="cos",
        base_lr=0.8,
        nesterov=True,  # pycls's OPTIM.NESTEROV default
    ),
    "gn_const": Setting(
        "gn_const",
        "GroupNorm, constant learning rate (the first sweep)",
        norm="group",
        lr_policy="constant",
        base_lr=0.25,  # the example's 2.0 diverges without BatchNorm
        nesterov=False,
    ),
}


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
    """Two conv + normalization blocks, global average pooling, a linear classifier.

    ``norm="batch"``: BatchNorm, as pycls's models and the example (its statistics are
    recomputed for every average before evaluation: pycls's ``BN.USE_PRECISE_STATS``).
    ``norm="group"``: GroupNorm, which holds no running statistics, so every average is
    evaluated as it is.
    """

    width: int = 16
    norm: str = "group"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        for features, strides in ((self.width, 1), (2 * self.width, 2)):
            x = PatchConv(features, strides)(x)
            if self.norm == "batch":
                x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
            else:
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


def learning_rates(setting: Setting, config: Config, steps_per_epoch: int) -> np.ndarray:
    """Every step's learning rate, linearly scaled with the batch (Goyal et al., 2017).

    ``cos``: pycls's ``get_epoch_lr`` (``pycls/core/optimizer.py``): per epoch ``e``,
    ``base * 0.5 * (1 + cos(pi * e / max_epoch))`` (``lr_fun_cos``, ``MIN_LR`` 0), times
    ``WARMUP_FACTOR * (1 - e / WARMUP_EPOCHS) + e / WARMUP_EPOCHS`` while ``e <
    WARMUP_EPOCHS``. ``constant``: a linear ramp per step from ``WARMUP_FACTOR * base``
    over the warmup epochs (``optax.warmup_constant_schedule``), then ``base``.
    """
    base = setting.base_lr * config.batch_size / REFERENCE_BATCH
    steps = config.epochs * steps_per_epoch
    if setting.lr_policy == "cos":
        epoch = np.repeat(np.arange(config.epochs, dtype=np.float64), steps_per_epoch)
        lr = base * 0.5 * (1.0 + np.cos(np.pi * epoch / config.epochs))
        ramp = np.minimum(epoch / WARMUP_EPOCHS, 1.0)
        return lr * np.where(epoch < WARMUP_EPOCHS, WARMUP_FACTOR * (1.0 - ramp) + ramp, 1.0)
    if setting.lr_policy == "constant":
        warm = WARMUP_EPOCHS * steps_per_epoch
        ramp = np.minimum(np.arange(steps, dtype=np.float64) / warm, 1.0)
        return base * (WARMUP_FACTOR + (1.0 - WARMUP_FACTOR) * ramp)
    raise ValueError(f"lr_policy must be 'cos' or 'constant', got {setting.lr_policy!r}")


@dataclasses.dataclass(frozen=True)
class _StackedApply:
    """``model.apply`` over a leading axis of models, as ``precise_batch_stats`` calls it.

    Hashable by the model, so that the precise-statistics loop compiles once per shape.
    """

    model: Cnn

    def __call__(self, variables: Any, x: jax.Array, **kwargs: Any) -> Any:
        return jax.vmap(lambda v: self.model.apply(v, x, **kwargs))(variables)


def run_config(
    setting: Setting, config: Config, seeds: list[int], data: tuple[np.ndarray, ...], quick: bool
) -> dict[str, Any]:
    """Trains every seed of one configuration; evaluates the raw weights and every average.

    Returns ``{"names": [...], "correct": (seed, 1 + K) ints, "nll": (seed, 1 + K)}``
    (column 0: the raw weights; ``correct`` counts test images, ``nll`` is the mean test
    cross-entropy), each average's half-life share, the step counts and the wall time.
    """
    x_train, y_train, x_test, y_test = data
    n, m = config.batch_size, config.epochs
    spe = len(x_train) // n  # the last partial batch dropped, as pycls's loader
    context = Context(n, m, spe, WARMUP_EPOCHS, UPDATE_PERIOD)
    scheduled, transforms = build_all(context, quick)
    ema = ema_jax.ema(scheduled)
    bemas = list(transforms.values())
    model = Cnn(norm=setting.norm)
    batch_norm = setting.norm == "batch"
    lrs = learning_rates(setting, config, spe)
    schedule = jnp.asarray(lrs, jnp.float32)
    tx = optax.chain(
        optax.add_decayed_weights(WEIGHT_DECAY),
        optax.sgd(lambda c: schedule[jnp.minimum(c, len(lrs) - 1)], MOMENTUM, setting.nesterov),
    )

    def init(key: jax.Array) -> tuple[Any, ...]:
        variables = model.init(key, jnp.ones((1, 8, 8, 1)))
        params = variables["params"]
        stats = variables.get("batch_stats", {})
        return params, stats, tx.init(params), ema.init(params), [b.init(params) for b in bemas]

    def loss_fn(params: Any, stats: Any, x: jax.Array, y: jax.Array) -> tuple[jax.Array, Any]:
        if batch_norm:
            logits, new = model.apply(
                {"params": params, "batch_stats": stats}, x, mutable=["batch_stats"]
            )
            stats = new["batch_stats"]
        else:
            logits = model.apply({"params": params}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), stats

    def step(carry: tuple[Any, ...], idx: jax.Array) -> tuple[tuple[Any, ...], None]:
        params, stats, opt, es, bs = carry
        grads, stats = jax.grad(loss_fn, has_aux=True)(params, stats, xs[idx], ys[idx])
        updates, opt = tx.update(grads, opt, params)
        params = optax.apply_updates(params, updates)
        es = ema.update(params, es)
        bs = [b.update(params, s) for b, s in zip(bemas, bs, strict=True)]
        return (params, stats, opt, es, bs), None

    def epoch(carry: tuple[Any, ...], order: jax.Array, restart: jax.Array) -> tuple[Any, ...]:
        carry, _ = jax.lax.scan(step, carry, order)
        params, stats, opt, es, bs = carry
        # The end of warmup: every scheduled average restarts from the weights (pycls
        # copies them through warmup; its schedules do so already, the others do not;
        # BEMA snapshots them itself, update_after).
        copied = jax.tree.map(lambda p, e: jnp.broadcast_to(p[..., None], e.shape), params, es.ema)
        ema_tree = jax.tree.map(lambda c, e: jnp.where(restart, c, e), copied, es.ema)
        return params, stats, opt, es._replace(ema=ema_tree), bs

    def stack(params: Any, es: Any, bs: list[Any]) -> Any:
        """One seed's models on a leading axis: the raw weights, the averages, BEMA's."""
        return jax.tree.map(
            lambda p, e, *b: jnp.concatenate([p[None], jnp.moveaxis(e, -1, 0), jnp.stack(b)]),
            params,
            es.ema,
            *[s.ema for s in bs],
        )

    def evaluate(variables: Any) -> tuple[jax.Array, jax.Array]:
        def one(v: Any) -> tuple[jax.Array, jax.Array]:
            logits = model.apply(v, xt, train=False)
            nll = optax.softmax_cross_entropy_with_integer_labels(logits, yt).mean()
            return jnp.sum(jnp.argmax(logits, -1) == yt), nll

        return jax.lax.map(one, variables, batch_size=EVAL_CHUNK)

    xs, ys = jnp.asarray(x_train), jnp.asarray(y_train)
    xt, yt = jnp.asarray(x_test), jnp.asarray(y_test)
    init_v = jax.jit(jax.vmap(init))
    epoch_v = jax.jit(jax.vmap(epoch, in_axes=(0, 0, None)), donate_argnums=0)
    stack_j = jax.jit(stack)
    eval_j = jax.jit(evaluate)
    apply_stacked = _StackedApply(model)
    # pycls's precise statistics: the training set in one fixed order, batches of n.
    precise_order = np.random.default_rng(2020).permutation(len(x_train))[: spe * n]
    precise_batches = x_train[precise_order].reshape(spe, n, 8, 8, 1)

    start = time.perf_counter()
    carry = init_v(jnp.stack([jax.random.key(s) for s in seeds]))
    for e in range(m):
        # The data order depends only on (seed, epoch).
        order = np.stack(
            [
                np.random.default_rng([s, e]).permutation(len(x_train))[: spe * n].reshape(spe, n)
                for s in seeds
            ]
        )
        carry = epoch_v(carry, order, jnp.asarray(e + 1 == WARMUP_EPOCHS))
    train_s = time.perf_counter() - start
    params, stats, _, es, bs = carry
    correct, nll = [], []
    for i in range(len(seeds)):
        one_seed = jax.tree.map(lambda x, i=i: x[i], (params, stats, es, bs))
        models = {"params": stack_j(one_seed[0], one_seed[2], one_seed[3])}
        if batch_norm:
            count = len(jax.tree.leaves(models["params"])[0])
            models["batch_stats"] = jax.tree.map(
                lambda s, count=count: jnp.broadcast_to(s, (count, *s.shape)), one_seed[1]
            )
            models["batch_stats"] = ema_jax.precise_batch_stats(
                apply_stacked, models, list(precise_batches)
            )
        c, loss = eval_j(models)
        correct.append(np.asarray(c))
        nll.append(np.asarray(loss))
    wall = time.perf_counter() - start
    names = [*scheduled, *transforms]
    everything = {**scheduled, **transforms}
    return {
        "names": names,
        "correct": np.stack(correct).astype(int),
        "nll": np.stack(nll).astype(np.float64),
        "half_life_fraction": {k: half_life_fraction(v, context) for k, v in everything.items()},
        "steps_per_epoch": spe,
        "learning_rate": float(setting.base_lr * n / REFERENCE_BATCH),
        "train_s": train_s,
        "wall_s": wall,
    }

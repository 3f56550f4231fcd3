"""pycls's precise-statistics loop without the model: the mean of per-batch statistics.

Framework-free (JAX only). ``stats_fn(variables, batch)`` computes one batch's
statistics; the linen wrapper (:func:`ema_jax.precise_batch_stats`) supplies one
that runs the model's own BatchNorm layers, and an NNX wrapper can supply its own.
This module takes as many batches as ``num_samples`` allows, runs ``stats_fn`` on
each under one compilation, and returns the mean of every statistic.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp

from ema_jax import _validate

PyTree = Any
StatsFn = Callable[[PyTree, Any], PyTree]

NUM_SAMPLES = 8192
"""pycls's default ``BN.NUM_SAMPLES_PRECISE``."""


def _stats(stats_fn: StatsFn, variables: PyTree, batch: Any) -> PyTree:
    return stats_fn(variables, batch)


def _add(stats_fn: StatsFn, variables: PyTree, batch: Any, total: PyTree) -> PyTree:
    stats = stats_fn(variables, batch)
    return jax.tree.map(lambda t, s: t + s.astype(t.dtype), total, stats)


def _divide(total: PyTree, count: jax.Array, dtypes: tuple[jnp.dtype, ...]) -> PyTree:
    leaves, treedef = jax.tree.flatten(total)
    means = [(t / count.astype(t.dtype)).astype(d) for t, d in zip(leaves, dtypes, strict=True)]
    return jax.tree.unflatten(treedef, means)


# Module-level jits, keyed by jax on (stats_fn, shapes, dtypes, shardings): each
# compiles once per model and input shape, however often the loop runs.
_stats_shapes = jax.jit(_stats, static_argnums=0)
_accumulate = jax.jit(_add, static_argnums=0, donate_argnums=3)
_mean = jax.jit(_divide, static_argnums=2, donate_argnums=0)


def _accumulation_dtype(dtype: jnp.dtype) -> jnp.dtype:
    """At least float32, so that a sum of many bf16 statistics does not round away."""
    return jnp.promote_types(dtype, jnp.float32)


def _signature(batch: Any) -> tuple[Any, ...]:
    leaves, treedef = jax.tree.flatten(batch)
    return (treedef, tuple((jnp.shape(x), jnp.result_type(x)) for x in leaves))


def _describe(signature: tuple[Any, ...]) -> str:
    return ", ".join(f"{dtype}{list(shape)}" for shape, dtype in signature[1])


def _batch_size(batch: Any) -> int:
    leaves = jax.tree.leaves(batch)
    if not leaves or jnp.ndim(leaves[0]) == 0:
        raise ValueError(
            "each element of batches must be the model's input, an array (or a pytree of"
            f" arrays) with a leading batch axis, got {type(batch).__name__} {batch!r:.80}"
        )
    return int(jnp.shape(leaves[0])[0])


def average_batch_stats(
    stats_fn: StatsFn,
    variables: PyTree,
    batches: Iterable[Any],
    *,
    num_samples: int = NUM_SAMPLES,
) -> PyTree:
    r"""The mean over batches of ``stats_fn(variables, batch)``: pycls's precise-BN loop.

    With ``B`` the leading dimension of the first batch's first leaf (the global
    batch), it takes the first :math:`n = \min(\lfloor\text{num\_samples}/B\rfloor,
    \text{len(batches)})` batches and returns, leaf by leaf,

    .. math::
      \bar s = \frac{1}{n}\sum_{i=1}^{n} \text{stats\_fn}(\text{variables}, b_i),

    summed in at least float32 and returned in each statistic's own dtype. pycls adds
    ``s_i / n`` instead of dividing once; the two differ by rounding only.

    Args:
      stats_fn: one batch's statistics, a pytree of floating arrays; a jit-able and
        hashable callable (a static argument: build it once, or make it compare
        equal by value, so that later calls reuse the compilation).
      variables: the model's variables, passed to ``stats_fn`` unchanged.
      batches: an iterable of batches, each passed to ``stats_fn`` as it is; consumed
        once, and only as far as needed. Every batch must have the first one's
        shapes and dtypes (each is weighted equally, as in pycls, whose training
        loader drops the last partial batch).
      num_samples: pycls's ``BN.NUM_SAMPLES_PRECISE``.

    Returns:
      The mean of each statistic, a pytree like ``stats_fn``'s output.

    Raises:
      ValueError: ``num_samples`` is not a positive integer or is less than the batch
        size, ``batches`` is empty, or a batch differs in shape from the first.
      TypeError: ``stats_fn`` is not hashable, ``batches`` is not iterable, or a
        statistic is not floating.

    Example:
      >>> import jax.numpy as jnp
      >>> from ema_jax._batch_stats import average_batch_stats
      >>> def column_means(variables, batch):
      ...     return {"mean": (batch * variables["scale"]).mean(0)}
      >>> batches = [jnp.array([[1.0], [3.0]]), jnp.array([[5.0], [7.0]]), jnp.ones((2, 1))]
      >>> average_batch_stats(column_means, {"scale": 2.0}, batches, num_samples=4)
      {'mean': Array([8.], dtype=float32)}
    """
    num_samples = _validate.check_positive_int("num_samples", num_samples)
    try:
        hash(stats_fn)
    except TypeError:
        raise TypeError(
            "stats_fn must be hashable (the jitted loop takes it as a static argument),"
            f" got {stats_fn!r:.80}"
        ) from None
    try:
        it = iter(batches)
    except TypeError:
        raise TypeError(
            f"batches must be an iterable of model inputs, got {type(batches).__name__}"
        ) from None
    first = next(it, _EMPTY)
    if first is _EMPTY:
        raise ValueError("batches is empty: precise statistics need at least one batch")
    batch_size = _batch_size(first)
    num_iter = num_samples // batch_size
    if num_iter == 0:
        raise ValueError(
            f"num_samples={num_samples} is less than the batch size {batch_size}: not one"
            f" batch fits (pycls uses num_samples // batch_size batches); pass"
            f" num_samples >= {batch_size}"
        )
    like = _stats_shapes.eval_shape(stats_fn, variables, first)
    for path, s in jax.tree_util.tree_flatten_with_path(like)[0]:
        if not jnp.issubdtype(s.dtype, jnp.floating):
            raise TypeError(
                f"stats_fn returned {s.dtype} at {jax.tree_util.keystr(path)}: only floating"
                " statistics can be averaged"
            )
    total = jax.tree.map(lambda s: jnp.zeros(s.shape, _accumulation_dtype(s.dtype)), like)
    signature = _signature(first)
    count = 0
    for i, batch in enumerate(itertools.chain([first], itertools.islice(it, num_iter - 1))):
        if i and _signature(batch) != signature:
            raise ValueError(
                f"batch {i} is {_describe(_signature(batch))}, but batch 0 was"
                f" {_describe(signature)}: every batch counts equally, so all must have"
                " the same shapes (drop the last partial batch, as pycls's loader does)"
            )
        total = _accumulate(stats_fn, variables, batch, total)
        count += 1
    dtypes = tuple(s.dtype for s in jax.tree.leaves(like))
    return _mean(total, jnp.asarray(count, jnp.int32), dtypes)


_EMPTY = object()

"""Precise BatchNorm statistics for a linen model: pycls's ``compute_precise_bn_stats``."""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util
from flax.core import FrozenDict

from ema_jax._batch_stats import NUM_SAMPLES
from ema_jax._batch_stats import average_batch_stats

PyTree = Any
Key = tuple[str, ...]

_STATS = ("mean", "var")
_DEFAULT_APPLY_KWARGS: tuple[tuple[str, Any], ...] = (("train", True),)


def _only_this_batch(
    layers: list[Key],
    next_fun: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    context: Any,  # flax.linen's InterceptorContext
) -> Any:
    """Runs every ``nn.BatchNorm`` call with momentum 0 and its running statistics zeroed.

    The layer then stores ``0 * 0 + 1 * batch_stat``: exactly the statistic it
    computed for this batch, in its own convention. Records the layer's path.
    """
    module = context.module
    if not isinstance(module, nn.BatchNorm) or context.method_name != "__call__":
        return next_fun(*args, **kwargs)
    use_running_average = kwargs.get("use_running_average", args[1] if len(args) > 1 else None)
    if nn.merge_param("use_running_average", module.use_running_average, use_running_average):
        raise ValueError(
            f"the BatchNorm at {'/'.join(module.path) or '<root>'} ran with"
            " use_running_average=True: precise statistics need the model in training"
            " mode; pass the apply_kwargs that select it (default {'train': True})"
        )
    if module.path not in layers:
        layers.append(module.path)
    for name in _STATS:  # so that NaN or Inf running statistics cannot leak in (0 * nan)
        if module.has_variable("batch_stats", name):
            zero = jnp.zeros_like(module.get_variable("batch_stats", name))
            module.put_variable("batch_stats", name, zero)
    momentum = module.momentum
    # The bound module is this trace's own instance: the change is undone before
    # anything else can see it.
    object.__setattr__(module, "momentum", 0.0)
    try:
        return next_fun(*args, **kwargs)
    finally:
        object.__setattr__(module, "momentum", momentum)


@dataclasses.dataclass(frozen=True)
class BatchNormStats:
    """One batch's BatchNorm statistics, computed by the model's own ``nn.BatchNorm`` layers.

    Calling it returns ``{(*layer_path, "mean" | "var"): array}`` for every
    ``nn.BatchNorm`` that ran in ``apply_fn(variables, batch, mutable=["batch_stats"],
    **apply_kwargs)``. Immutable and comparing equal by value, so that the jitted
    loop compiles once however often it is rebuilt.
    """

    apply_fn: Callable[..., Any]
    apply_kwargs: tuple[tuple[str, Any], ...] = _DEFAULT_APPLY_KWARGS

    def __call__(self, variables: PyTree, batch: Any) -> dict[Key, jax.Array]:
        layers: list[Key] = []
        with nn.intercept_methods(functools.partial(_only_this_batch, layers)):
            _, updates = self.apply_fn(
                variables, batch, mutable=["batch_stats"], **dict(self.apply_kwargs)
            )
        if not layers:
            raise ValueError(_NO_BATCHNORM)
        flat = traverse_util.flatten_dict(dict(updates["batch_stats"]))
        return {key: value for key, value in flat.items() if key[:-1] in layers}


_NO_BATCHNORM = (
    "the model ran no flax.linen.BatchNorm layer: there are no BatchNorm statistics to recompute"
)


def batch_norm_stats(
    apply_fn: Callable[..., Any], apply_kwargs: Mapping[str, Any] | None = None
) -> BatchNormStats:
    """Checks ``apply_kwargs`` and builds the per-batch statistics function."""
    if not callable(apply_fn):
        raise TypeError(f"apply_fn must be callable (e.g. model.apply), got {apply_fn!r:.80}")
    if apply_kwargs is None:
        return BatchNormStats(apply_fn)
    if not isinstance(apply_kwargs, Mapping) or "mutable" in apply_kwargs:
        raise TypeError(
            "apply_kwargs must be a mapping of keyword arguments for apply_fn, without"
            f" 'mutable' (precise_batch_stats sets it), got {apply_kwargs!r:.80}"
        )
    items = tuple(sorted(apply_kwargs.items()))
    try:
        hash(items)
    except TypeError:
        raise TypeError(
            "apply_kwargs values must be hashable (they are static, like train=True),"
            f" got {apply_kwargs!r:.80}"
        ) from None
    return BatchNormStats(apply_fn, items)


def _batch_stats_of(variables: Any, what: str) -> PyTree:
    if not isinstance(variables, Mapping) or variables.get("batch_stats") is None:
        keys = list(variables) if isinstance(variables, Mapping) else type(variables).__name__
        raise ValueError(
            f"{what} has no 'batch_stats' collection (got {keys}): the model has no"
            " BatchNorm statistics to recompute"
        )
    return variables["batch_stats"]


def replace_stats(batch_stats: PyTree, stats: Mapping[Key, jax.Array]) -> PyTree:
    """``batch_stats`` with the leaves at ``stats``' keys replaced; the rest unchanged."""
    flat = traverse_util.flatten_dict(dict(batch_stats))
    missing = [key for key in stats if key not in flat]
    if missing:
        raise ValueError(
            f"the model's BatchNorm statistic {'/'.join(missing[0])} is not in the given"
            " batch_stats: pass the variables of this model"
        )
    new = traverse_util.unflatten_dict({**flat, **stats})
    return FrozenDict(new) if isinstance(batch_stats, FrozenDict) else new


_REQUIRED: Any = object()  # batches' default: a missing argument, told apart from an NNX call


def _refuse_nnx(apply_fn: Any) -> None:
    """An ``nnx.Module`` where linen's ``apply_fn`` goes: name the NNX function instead."""
    nnx = sys.modules.get("flax.nnx")  # loaded wherever an NNX model exists
    if nnx is not None and isinstance(apply_fn, nnx.Module):
        raise TypeError(
            "ema_jax.precise_batch_stats is flax.linen's (apply_fn, variables, batches); for"
            f" the NNX model {type(apply_fn).__name__} use"
            " ema_jax.nnx.precise_batch_stats(model, batches)"
        )


def precise_batch_stats(
    apply_fn: Callable[..., Any],
    variables: Mapping[str, PyTree],
    batches: Iterable[Any] = _REQUIRED,
    *,
    num_samples: int = NUM_SAMPLES,
    apply_kwargs: Mapping[str, Any] | None = None,
) -> PyTree:
    r"""pycls's precise BatchNorm statistics for ``variables``, raw or EMA.

    For every ``flax.linen.BatchNorm`` layer, with :math:`n = \min(\lfloor
    \text{num\_samples}/B\rfloor, \text{len(batches)})` for the global batch size
    :math:`B`, and :math:`\mu_i, \sigma^2_i` the layer's batch mean and batch
    variance on batch :math:`i` (under these ``variables``):

    .. math::
      \text{mean} = \frac{1}{n}\sum_{i=1}^{n}\mu_i,\qquad
      \text{var} = \frac{1}{n}\sum_{i=1}^{n}\sigma^2_i .

    This is pycls's ``compute_precise_bn_stats`` (facebookresearch/pycls,
    ``pycls/core/net.py`` lines 24-53 in the version that also defines
    ``update_model_ema``; ``train_model`` in ``pycls/core/trainer.py`` calls it on the
    model and on the EMA model after every epoch; ``pycls/core/config.py`` sets
    ``BN.USE_PRECISE_STATS = True`` and ``BN.NUM_SAMPLES_PRECISE = 8192``). It sets
    each layer's momentum to 1 so that its running statistics hold one batch's, and
    averages them over ``int(NUM_SAMPLES_PRECISE / loader.batch_size / NUM_GPUS)``
    batches (the global batch). What is reproduced, and what differs:

    - The variance is the layer's own: flax stores the biased batch variance
      (divided by the number of reduced entries :math:`N`), PyTorch the unbiased one
      (:math:`N - 1`), so pycls's values are larger by :math:`N/(N-1)`; each layer
      gets the statistics it normalizes with in training.
    - The batch axis is reduced as the layer does in training: under ``jax.jit``
      over sharded batches, flax's BatchNorm reduces over the global batch, so the
      result does not depend on the number of devices; a layer with ``axis_name``
      averages over that axis when ``apply_fn`` runs it inside ``shard_map``. pycls on
      several GPUs averages per-GPU statistics (``dist.scaled_all_reduce``), which
      for the variance leaves out the spread between the GPUs' means.
    - Older pycls (``pycls/utils/net.py``) stored :math:`E[\sigma^2_i + \mu_i^2] -
      \text{mean}^2` instead, which adds the variance of the batch means; the EMA
      recipe's pycls averages the variances, as here.
    - pycls adds :math:`\mu_i/n` per batch; this sums, then divides once.

    How: ``apply_fn(variables, batch, mutable=["batch_stats"], **apply_kwargs)`` runs
    the model's own layers under a ``flax.linen.intercept_methods`` interceptor that,
    for each ``nn.BatchNorm`` call only, zeroes its running statistics and sets its
    momentum to 0 for that call, so that the layer stores exactly the statistic it
    computed (``0 * 0 + 1 * batch``); dividing ``momentum * old + (1 - momentum) *
    batch`` back out would lose bits. Nothing of the layer is re-implemented, and
    its momentum and everything else are untouched in the result. The loop is jitted
    once per ``apply_fn`` and input shapes, however often it runs.

    Call it after an epoch, with training batches, and evaluate with the result;
    :meth:`ema_jax.EmaTrainState.with_precise_batch_stats` does it for the raw and
    the EMA weights in one pass.

    Args:
      apply_fn: the model's apply, e.g. ``model.apply`` (hashable: the same object
        on every call reuses the compilation).
      variables: ``{"params": ..., "batch_stats": ..., ...}``, the raw or the EMA
        weights.
      batches: an iterable of model inputs (each passed as ``apply_fn``'s second
        argument; for a loader of ``(inputs, labels)``, pass ``(x for x, _ in
        loader)``), all of one shape, whose leading axis is the global batch.
        Consumed once, as far as needed.
      num_samples: pycls's ``BN.NUM_SAMPLES_PRECISE``: use ``num_samples // B``
        batches at most.
      apply_kwargs: keyword arguments that put the model in training mode, hashable
        values; default ``{"train": True}``.

    Returns:
      New batch statistics shaped like ``variables["batch_stats"]``: every BatchNorm
      layer's ``mean`` and ``var`` recomputed, any other entry unchanged.

    Raises:
      ValueError: no ``batch_stats`` in ``variables``, no BatchNorm ran, a BatchNorm
        ran in evaluation mode, ``batches`` is empty, a batch's shape differs from
        the first's, or ``num_samples`` is not a positive integer or is below the
        batch size.
      TypeError: ``apply_fn`` is not callable (an ``nnx.Module`` is told to use
        :func:`ema_jax.nnx.precise_batch_stats`), ``apply_kwargs`` is not a mapping
        of hashable values, or ``batches`` is not iterable or missing.

    Example:
      >>> import flax.linen as nn, jax, jax.numpy as jnp
      >>> import ema_jax
      >>> class Net(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, x, train=True):
      ...         return nn.BatchNorm(use_running_average=not train)(nn.Dense(2)(x))
      >>> model = Net()
      >>> variables = model.init(jax.random.key(0), jnp.ones((1, 3)))
      >>> batches = [jax.random.normal(jax.random.key(i), (4, 3)) for i in range(3)]
      >>> stats = ema_jax.precise_batch_stats(model.apply, variables, batches)
      >>> stats["BatchNorm_0"]["mean"].shape
      (2,)
      >>> logits = model.apply({**variables, "batch_stats": stats}, batches[0], train=False)

    References:
      Radosavovic et al., pycls (``compute_precise_bn_stats``), 2020; Wu and Johnson,
      "Rethinking 'Batch' in BatchNorm", 2021 (why precise statistics matter).
    """
    _refuse_nnx(apply_fn)
    if batches is _REQUIRED:
        raise TypeError("precise_batch_stats() missing 1 required positional argument: 'batches'")
    batch_stats = _batch_stats_of(variables, "variables")
    stats_fn = batch_norm_stats(apply_fn, apply_kwargs)
    means = average_batch_stats(stats_fn, variables, batches, num_samples=num_samples)
    return replace_stats(batch_stats, means)


@dataclasses.dataclass(frozen=True)
class _Both:
    """The statistics of two sets of variables (raw, EMA) on the same batch."""

    stats_fn: BatchNormStats

    def __call__(self, variables: tuple[PyTree, PyTree], batch: Any) -> tuple[PyTree, PyTree]:
        return tuple(self.stats_fn(v, batch) for v in variables)  # type: ignore[return-value]


def precise_batch_stats_pair(
    apply_fn: Callable[..., Any],
    raw: Mapping[str, PyTree],
    ema: Mapping[str, PyTree],
    batches: Iterable[Any],
    *,
    num_samples: int,
    apply_kwargs: Mapping[str, Any] | None,
) -> tuple[PyTree, PyTree]:
    """:func:`precise_batch_stats` of the raw and the EMA variables in one pass over ``batches``."""
    raw_stats = _batch_stats_of(raw, "the raw variables")
    ema_stats = _batch_stats_of(ema, "the EMA variables")
    pair = _Both(batch_norm_stats(apply_fn, apply_kwargs))
    raw_means, ema_means = average_batch_stats(pair, (raw, ema), batches, num_samples=num_samples)
    return replace_stats(raw_stats, raw_means), replace_stats(ema_stats, ema_means)

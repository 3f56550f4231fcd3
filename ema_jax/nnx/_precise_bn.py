"""Precise BatchNorm statistics for an NNX model: pycls's ``compute_precise_bn_stats``.

The model's own ``nnx.BatchNorm`` layers compute each batch's statistics, on a copy
merged inside the jitted loop of :func:`ema_jax._batch_stats.average_batch_stats`;
this module only finds the layers, sets up the copy, and moves the results in and out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ema_jax._batch_stats import NUM_SAMPLES
from ema_jax._batch_stats import average_batch_stats
from ema_jax.nnx._ema import Ema

Path = tuple[Any, ...]

_STATS = ("mean", "var")
_NO_BATCHNORM = (
    "{where}: the model has no flax.nnx.BatchNorm layer: there are no BatchNorm"
    " statistics to recompute"
)


def _path(path: Path) -> str:
    """``("layers", 0, "bn")`` as ``model.layers[0].bn``: the attribute access."""
    out = "model"
    for key in path:
        out += f".{key}" if isinstance(key, str) and key.isidentifier() else f"[{key!r}]"
    return out


@dataclasses.dataclass(frozen=True)
class BatchNormStats:
    """One batch's statistics of the BatchNorm layers at ``layers``: mean, var, mean, ...

    Merges ``graphdef`` with the given state into a fresh copy of the model, puts each
    of those layers in training mode with momentum 0 and zeroed running statistics, runs
    the model on the batch, and reads what the layers stored: ``0 * 0 + 1 * batch``,
    exactly the statistic each computed, in its own convention (zeroing first keeps
    NaN or Inf running statistics out, ``0 * nan``). Immutable and comparing equal by
    value, so that the jitted loop compiles once per model and input shape.
    """

    graphdef: Any  # nnx.GraphDef: static, hashable, equal for models of one structure
    layers: tuple[Path, ...]

    def __call__(self, state: nnx.State, batch: Any) -> tuple[jax.Array, ...]:
        model = nnx.merge(self.graphdef, state)
        modules: dict[Path, Any] = dict(nnx.iter_modules(model))
        zeros = []
        for path in self.layers:
            layer = modules[path]
            layer.use_running_average = False  # what nnx.view(..., False) sets
            layer.momentum = 0.0  # on this trace's copy only
            for name in _STATS:
                variable = getattr(layer, name)
                variable[...] = jnp.zeros_like(variable[...])
            zeros.append(tuple(getattr(layer, name).get_value() for name in _STATS))
        model(batch)
        out: list[jax.Array] = []
        for path, zero in zip(self.layers, zeros, strict=True):
            layer = modules[path]
            values = tuple(getattr(layer, name).get_value() for name in _STATS)
            if any(v is z for v, z in zip(values, zero, strict=True)):
                raise ValueError(
                    f"precise_batch_stats: the BatchNorm at {_path(path)} computed no batch"
                    " statistics: model(batch) did not run it, or ran it with"
                    " use_running_average=True passed in the call; precise statistics need"
                    " every BatchNorm to run in training mode"
                )
            out.extend(values)
        return tuple(out)


@dataclasses.dataclass(frozen=True)
class _Each:
    """The statistics of several states of one model (raw, EMA) on the same batch."""

    stats_fn: BatchNormStats

    def __call__(self, states: tuple[nnx.State, ...], batch: Any) -> tuple[Any, ...]:
        return tuple(self.stats_fn(state, batch) for state in states)


def _check_model(model: Any, where: str) -> None:
    if not isinstance(model, nnx.Module):
        text = repr(model)
        raise TypeError(
            f"{where}: model must be an NNX model (an nnx.Module), got"
            f" {type(model).__name__} {text[:60]}{'...' if len(text) > 60 else ''}; for a"
            " linen model use ema_jax.precise_batch_stats(model.apply, variables, batches)"
        )


def _layers(model: nnx.Module, where: str) -> tuple[Path, ...]:
    layers = tuple(path for path, m in nnx.iter_modules(model) if isinstance(m, nnx.BatchNorm))
    if not layers:
        raise ValueError(_NO_BATCHNORM.format(where=where))
    return layers


def _targets(model: Any, layers: tuple[Path, ...]) -> list[tuple[Path, nnx.Variable]]:
    """The BatchStat variables the statistics go to, in the order ``BatchNormStats`` gives."""
    modules = dict(nnx.iter_modules(model))
    return [((*path, name), getattr(modules[path], name)) for path in layers for name in _STATS]


def precise_batch_stats(
    model: nnx.Module, batches: Iterable[Any], *, num_samples: int = NUM_SAMPLES
) -> nnx.State:
    r"""pycls's precise BatchNorm statistics for an NNX model (raw, or an EMA's view).

    For every ``nnx.BatchNorm`` layer, with :math:`n = \min(\lfloor
    \text{num\_samples}/B\rfloor, \text{len(batches)})` for the global batch size
    :math:`B`, and :math:`\mu_i, \sigma^2_i` the layer's batch mean and batch variance
    on batch :math:`i`:

    .. math::
      \text{mean} = \frac{1}{n}\sum_{i=1}^{n}\mu_i,\qquad
      \text{var} = \frac{1}{n}\sum_{i=1}^{n}\sigma^2_i .

    The NNX counterpart of :func:`ema_jax.precise_batch_stats` (its docstring says what
    of pycls's ``compute_precise_bn_stats`` is reproduced): flax's biased variance; the
    batch axis reduced as the layer reduces it in training (over the global batch under
    ``jax.jit`` on sharded batches, whatever the number of devices; over ``axis_name``
    where the model runs the layer inside ``shard_map``).

    How: ``model(batch)`` runs on a copy of the model (``nnx.split``, then
    ``nnx.merge`` inside the jitted loop) whose BatchNorm layers are in training mode
    (``use_running_average=False``, as ``nnx.view`` sets it) with momentum 0 and zeroed
    running statistics, so that each stores exactly the statistic it computed; nothing
    of the layer is re-implemented. ``model`` itself is not changed. Every other layer
    runs in the mode ``model`` is in: pycls runs its model in training mode, dropout
    included; ``nnx.view(model, deterministic=False)`` does that here (every batch then
    draws the same dropout keys: RNG streams are not advanced between batches). The
    loop is jitted once per model structure and input shapes, however often it runs.

    Call it after an epoch, outside the jitted train step, with training batches;
    ``nnx.update(model, stats)`` installs the result. :func:`recompute_batch_stats`
    does it for the model and its EMA in one pass, as pycls's trainer does.

    Args:
      model: the NNX model (or a view, e.g. ``ema.apply_to(model)``).
      batches: an iterable of model inputs, each ``model``'s one argument with a
        leading batch axis, all of the first one's shapes; consumed once, and only
        as far as needed.
      num_samples: pycls's ``BN.NUM_SAMPLES_PRECISE``.

    Returns:
      An ``nnx.State`` of the BatchNorm layers' ``mean`` and ``var`` (``nnx.BatchStat``
      variables, new ones, in the model's dtypes and metadata), at the model's paths.

    Raises:
      TypeError: ``model`` is not an ``nnx.Module``, or ``batches`` is not iterable.
      ValueError: the model has no ``nnx.BatchNorm``, a BatchNorm did not compute
        statistics (it did not run, or ran with ``use_running_average=True`` passed in
        its call), ``batches`` is empty, a batch's shape differs from the first's, or
        ``num_samples`` is not a positive integer or is below the batch size.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> from ema_jax import nnx as ema_nnx
      >>> model = nnx.Sequential(nnx.Linear(3, 2, rngs=nnx.Rngs(0)),
      ...                        nnx.BatchNorm(2, rngs=nnx.Rngs(0)))
      >>> batches = [jax.random.normal(jax.random.key(i), (4, 3)) for i in range(3)]
      >>> stats = ema_nnx.precise_batch_stats(model, batches)
      >>> stats["layers"][1]["mean"].shape
      (2,)
      >>> nnx.update(model, stats)  # evaluate with these
      >>> logits = nnx.view(model, use_running_average=True)(batches[0])

    References:
      Radosavovic et al., pycls (``compute_precise_bn_stats``), 2020; Wu and Johnson,
      "Rethinking 'Batch' in BatchNorm", 2021 (why precise statistics matter).
    """
    _check_model(model, "precise_batch_stats")
    layers = _layers(model, "precise_batch_stats")
    graphdef, state = nnx.split(model)
    means = average_batch_stats(
        BatchNormStats(graphdef, layers), state, batches, num_samples=num_samples
    )
    return nnx.from_flat_state(
        [
            (path, variable.copy(jnp.asarray(mean, variable.get_value().dtype)))
            for (path, variable), mean in zip(_targets(model, layers), means, strict=True)
        ]
    )


def recompute_batch_stats(
    model: nnx.Module, ema: Ema, batches: Iterable[Any], *, num_samples: int = NUM_SAMPLES
) -> None:
    """pycls's end of epoch: precise BatchNorm statistics for the model and its EMA, in place.

    pycls's trainer, after every epoch with ``BN.USE_PRECISE_STATS`` (its default),
    calls ``compute_precise_bn_stats`` on the model and on the EMA model, overwriting
    both models' running statistics. This does the same with
    :func:`precise_batch_stats` (see there for the exact statistics) in one pass over
    ``batches`` and one compilation: ``model``'s BatchNorm statistics become those of
    its own weights, and the EMA's averaged statistics those of the EMA weights
    (``ema.apply_to(model)``'s). The EMA's later updates keep averaging from there, as
    in pycls. With several averages (``ema_jax.ema((s1, s2, ...))``) each average gets
    the statistics of its own weights. Evaluate the EMA before this call to compare
    averaged and precise statistics.

    Call it after an epoch, outside the jitted train step, with training batches.
    ``ema.step`` and everything but the two sets of statistics are unchanged.

    Args:
      model: the NNX model the EMA averages.
      ema: its :class:`Ema`, holding the BatchNorm statistics (the default ``only``).
      batches: an iterable of model inputs (see :func:`precise_batch_stats`).
      num_samples: pycls's ``BN.NUM_SAMPLES_PRECISE``.

    Raises:
      TypeError: ``ema`` is no :class:`Ema`, or any error of :func:`precise_batch_stats`.
      ValueError: the EMA does not hold a BatchNorm layer's statistics (its ``only``
        leaves them out), ``model`` does not match the EMA, or any error of
        :func:`precise_batch_stats`.

    Example:
      >>> import jax
      >>> from flax import nnx
      >>> import ema_jax
      >>> from ema_jax import nnx as ema_nnx
      >>> model = nnx.Sequential(nnx.Linear(3, 2, rngs=nnx.Rngs(0)),
      ...                        nnx.BatchNorm(2, rngs=nnx.Rngs(0)))
      >>> ema = ema_nnx.Ema(model, ema_jax.ema(ema_jax.schedules.pycls(
      ...     ema_alpha=1e-3, batch_size=4, max_epoch=10)))
      >>> batches = [jax.random.normal(jax.random.key(i), (4, 3)) for i in range(3)]
      >>> ema_nnx.recompute_batch_stats(model, ema, batches)  # after an epoch
      >>> logits = nnx.view(ema.apply_to(model), use_running_average=True)(batches[0])
    """
    _check_model(model, "recompute_batch_stats")
    if not isinstance(ema, Ema):
        raise TypeError(
            "recompute_batch_stats: ema must be the model's ema_jax.nnx.Ema, got"
            f" {type(ema).__name__} {ema!r:.60}"
        )
    layers = _layers(model, "recompute_batch_stats")
    several = bool(getattr(ema.transform, "several", False))
    count = len(ema.transform.schedules) if several else 1
    # The EMA's views (checking that model matches the EMA), one per average.
    views = [ema.apply_to(model, k if several else None) for k in range(count)]
    targets = _targets(model, layers)
    held = dict(nnx.to_flat_state(ema.params))
    for path, _ in targets:
        if path not in held:
            raise ValueError(
                f"recompute_batch_stats: the EMA does not hold {_path(path)} (only="
                f"{ema.filter!r}), so its view evaluates with the model's own statistics;"
                " build the Ema with nnx.BatchStat in only, or recompute the model's alone:"
                " nnx.update(model, precise_batch_stats(model, batches))"
            )
    graphdef, raw = nnx.split(model)
    states = (raw, *(nnx.split(view)[1] for view in views))
    all_means = average_batch_stats(
        _Each(BatchNormStats(graphdef, layers)), states, batches, num_samples=num_samples
    )
    for (_, variable), mean in zip(targets, all_means[0], strict=True):
        variable.set_value(jnp.asarray(mean, variable.get_value().dtype))
    for k, means in enumerate(all_means[1:]):
        for (path, _), mean in zip(targets, means, strict=True):
            variable = held[path]
            old = variable.get_value()
            mean = jnp.asarray(mean, old.dtype)
            variable.set_value(old.at[..., k].set(mean) if several else mean)

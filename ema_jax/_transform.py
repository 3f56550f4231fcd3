"""`normalized_ema`: pycls's batch-size-normalized EMA as an init/update transform."""

from __future__ import annotations

import dataclasses
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ema_jax import _report as _explain
from ema_jax import _validate as _schedule

PyTree = Any


class EmaState(NamedTuple):
    """The state of a :func:`normalized_ema` transform: arrays only.

    Attributes:
      step: optimizer steps seen so far, i.e. calls of ``update``; saturates at
        ``2**31 - 1`` instead of wrapping (past it, every call does what the call at
        step ``2**31 - 1`` did: the cadence needs an exact count, and an int32 holds
        68 years of training at 1 step per second).
      ema: the moving average, a pytree shaped like the parameters.
      nonfinite_updates: with ``skip_nonfinite=True``, the updates at which some
        parameter entry was NaN or Inf (those entries kept their previous EMA
        value); always 0 with ``skip_nonfinite=False`` or ``count_nonfinite=False``.
    """

    step: jax.Array  # shape=(), int32
    ema: PyTree  # like params; floating leaves in ema_dtype when given
    nonfinite_updates: jax.Array  # shape=(), int32


_ARRAY_TYPES = (jax.Array, np.ndarray, np.generic, int, float)


def _is_numeric(x: Any) -> bool:
    dtype = x.dtype if hasattr(x, "dtype") else np.result_type(x)
    return bool(jnp.issubdtype(dtype, jnp.number) or jnp.issubdtype(dtype, jnp.bool_))


def _is_float(x: Any) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.floating)


def _check_params_match(params: PyTree, ema: PyTree) -> PyTree:
    """Checks that ``params`` fits the EMA leaf by leaf; returns it in the EMA's treedef.

    Raises ``ValueError`` naming the first path that differs (missing, extra,
    other shape, floating vs integer), in Python, before any tracing error.
    Containers of another type but the same paths (``dict`` vs ``FrozenDict``)
    are accepted.
    """
    keystr = jax.tree_util.keystr
    p_leaves, _ = jax.tree_util.tree_flatten_with_path(params)
    e_leaves, e_def = jax.tree_util.tree_flatten_with_path(ema)
    p_paths = [keystr(path) for path, _ in p_leaves]
    e_paths = [keystr(path) for path, _ in e_leaves]
    if p_paths != e_paths:
        missing = [path for path in e_paths if path not in set(p_paths)]
        extra = [path for path in p_paths if path not in set(e_paths)]
        problems = [f"params lacks the EMA's leaf ema{path}" for path in missing[:1]]
        problems += [f"params{path} has no EMA leaf" for path in extra[:1]]
        problems = problems or ["the leaves come in another order"]
        raise ValueError(
            f"params do not match the EMA: {'; '.join(problems)}"
            f" ({len(missing)} missing, {len(extra)} extra of {len(e_paths)} EMA leaves)"
        )
    for path, (_, p), (_, e) in zip(p_paths, p_leaves, e_leaves, strict=True):
        if jnp.shape(p) != jnp.shape(e):
            raise ValueError(
                f"params{path} has shape {jnp.shape(p)}, but the EMA's leaf has shape"
                f" {jnp.shape(e)}"
            )
        if _is_float(p) != _is_float(e):
            raise ValueError(
                f"params{path} has dtype {jnp.result_type(p)}, but the EMA's leaf has"
                f" dtype {jnp.result_type(e)}: a floating leaf must stay floating and an"
                " integer leaf integer"
            )
    return jax.tree_util.tree_unflatten(e_def, [p for _, p in p_leaves])


@dataclasses.dataclass(frozen=True)
class NormalizedEma:
    """pycls's normalized EMA of a parameter pytree; build it with :func:`normalized_ema`.

    Immutable and hashable: its hyperparameters are static Python values, so it can
    sit in a jitted function's closure or a flax ``struct.field(pytree_node=False)``.
    """

    ema_alpha: float
    batch_size: float
    max_epoch: float
    update_period: int = 32
    warmup_epochs: int = 0
    steps_per_epoch: int | None = None
    rule: _schedule.Rule = "linear"
    ema_dtype: np.dtype | None = None
    skip_nonfinite: bool = True
    count_nonfinite: bool = True
    alpha: float = dataclasses.field(init=False)
    """The per-update step size, a Python float resolved once from the rest."""

    def __post_init__(self) -> None:
        s = object.__setattr__
        s(self, "ema_alpha", _schedule.check_nonnegative_real("ema_alpha", self.ema_alpha))
        s(self, "batch_size", _schedule.check_positive_real("batch_size", self.batch_size))
        s(self, "max_epoch", _schedule.check_positive_real("max_epoch", self.max_epoch))
        k = _schedule.check_nonnegative_int("update_period", self.update_period)
        s(self, "update_period", k)
        w = _schedule.check_nonnegative_int("warmup_epochs", self.warmup_epochs)
        s(self, "warmup_epochs", w)
        if self.steps_per_epoch is not None:
            spe = _schedule.check_positive_int("steps_per_epoch", self.steps_per_epoch)
            s(self, "steps_per_epoch", spe)
        elif w > 0:
            raise ValueError(
                f"warmup_epochs={w!r} needs steps_per_epoch to know where epochs end,"
                " got steps_per_epoch=None"
            )
        s(self, "rule", _schedule.check_rule(self.rule))
        if self.ema_dtype is not None:
            try:
                dtype = np.dtype(jnp.dtype(self.ema_dtype))
            except TypeError:
                dtype = None
            if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
                raise ValueError(
                    f"ema_dtype must be a floating dtype or None, got {self.ema_dtype!r}"
                )
            s(self, "ema_dtype", dtype)
        if not isinstance(self.skip_nonfinite, bool):
            raise ValueError(f"skip_nonfinite must be a bool, got {self.skip_nonfinite!r}")
        if not isinstance(self.count_nonfinite, bool):
            raise ValueError(f"count_nonfinite must be a bool, got {self.count_nonfinite!r}")
        s(
            self,
            "alpha",
            _schedule.resolve_alpha(self.rule, self.ema_alpha, self.batch_size, self.max_epoch, k),
        )

    def explain(self, *, dataset_size: int | None = None, dtype: Any = None) -> _explain.EmaReport:
        """What these hyperparameters mean: :func:`ema_jax.explain` on this EMA's own.

        Args:
          dataset_size: samples per epoch, for the fractions of training when the EMA
            was built without ``steps_per_epoch``.
          dtype: the EMA's dtype for the resolution check; None takes ``ema_dtype``,
            or float32 when that is None too.

        Example:
          >>> import ema_jax
          >>> ema = ema_jax.normalized_ema(ema_alpha=2.5e-4, batch_size=128,
          ...                              max_epoch=100, steps_per_epoch=390)
          >>> report = ema.explain()
          >>> report.alpha == ema.alpha, report.updates_per_epoch
          (True, 13)
        """
        if dtype is None:
            dtype = self.ema_dtype if self.ema_dtype is not None else "float32"
        return _explain.explain(
            ema_alpha=self.ema_alpha,
            batch_size=self.batch_size,
            max_epoch=self.max_epoch,
            update_period=self.update_period,
            warmup_epochs=self.warmup_epochs,
            steps_per_epoch=self.steps_per_epoch,
            dataset_size=dataset_size,
            rule=self.rule,
            dtype=dtype,
            cadence="run" if self.steps_per_epoch is None else "epoch",
        )

    def settings(self) -> dict[str, Any]:
        """This EMA's configuration as a JSON-ready dict (stored with checkpoints).

        ``{"schedule": {"name": ..., <hyperparameters>}, "ema_dtype": str | None,
        "nonfinite": str}``: the schedule and the dtype decide the numbers, the guard
        only what happens to NaN/Inf.
        """
        schedule = {"name": "pycls"} | {
            name: getattr(self, name)
            for name in (
                "ema_alpha",
                "batch_size",
                "max_epoch",
                "update_period",
                "warmup_epochs",
                "steps_per_epoch",
                "rule",
            )
        }
        nonfinite = "propagate"
        if self.skip_nonfinite:
            nonfinite = "skip_and_count" if self.count_nonfinite else "skip"
        dtype = None if self.ema_dtype is None else np.dtype(self.ema_dtype).name
        return {"schedule": schedule, "ema_dtype": dtype, "nonfinite": nonfinite}

    def init(self, params: PyTree) -> EmaState:
        """Starts the EMA as a copy of ``params`` (floating leaves cast to ``ema_dtype``).

        The copy owns its buffers, so donating ``params`` later never frees the EMA.
        """

        for path, p in jax.tree_util.tree_flatten_with_path(params)[0]:
            if not isinstance(p, _ARRAY_TYPES) or not _is_numeric(p):
                raise TypeError(
                    f"params{jax.tree_util.keystr(path)} must be a numeric array, got"
                    f" {type(p).__name__} {p!r:.60}"
                )

        def copy_leaf(p: Any) -> jax.Array:
            dtype = self.ema_dtype if self.ema_dtype is not None and _is_float(p) else None
            return jnp.array(p, dtype=dtype, copy=True)

        # Two distinct buffers: donating a state whose fields share one fails.
        return EmaState(
            step=jnp.zeros((), jnp.int32),
            ema=jax.tree.map(copy_leaf, params),
            nonfinite_updates=jnp.zeros((), jnp.int32),
        )

    def update(self, params: PyTree, state: EmaState) -> EmaState:
        """Folds ``params`` into the EMA; call once after every optimizer step.

        Call number ``i = state.step`` does what pycls's ``update_model_ema`` does at
        ``cur_epoch = i // steps_per_epoch``, ``cur_iter = i % steps_per_epoch``
        (``cur_iter = i`` and no warmup when ``steps_per_epoch`` is None): if
        ``update_period > 0`` and ``cur_iter % update_period == 0``, floating leaves
        become ``ema + alpha * (params - ema)``, or a copy of ``params`` while
        ``cur_epoch < warmup_epochs``; integer and bool leaves are copied. Other
        calls leave the EMA untouched and cost next to nothing (``lax.cond``).
        ``step`` always advances.
        """
        if not isinstance(state, EmaState):
            raise TypeError(
                f"state must be the EmaState that init returned, got {type(state).__name__}"
                " (the order is update(params, state))"
            )
        params = _check_params_match(params, state.ema)
        step = optax.safe_increment(state.step)
        if self.update_period == 0:
            return state._replace(step=step)
        i, spe = state.step, self.steps_per_epoch
        cur_iter = i if spe is None else i % spe
        is_update = cur_iter % self.update_period == 0
        # warmup_epochs > 0 implies steps_per_epoch (checked at construction).
        warm = i // spe < self.warmup_epochs if spe is not None and self.warmup_epochs else None

        def fold(params: PyTree, ema: PyTree) -> tuple[PyTree, jax.Array]:
            return self._fold(params, ema, warm)

        def skip(params: PyTree, ema: PyTree) -> tuple[PyTree, jax.Array]:
            return ema, jnp.zeros((), jnp.int32)

        # One two-way cond: XLA:CPU runs a three-way switch several times slower.
        ema, bad = jax.lax.cond(is_update, fold, skip, params, state.ema)
        return EmaState(step=step, ema=ema, nonfinite_updates=state.nonfinite_updates + bad)

    def _fold(
        self, params: PyTree, ema: PyTree, warm: jax.Array | None
    ) -> tuple[PyTree, jax.Array]:
        """One EMA update: returns the new EMA, and 1 if ``params`` had NaN/Inf.

        Floating leaves become ``ema + alpha * (params - ema)``, blended in at least
        fp32 (a bf16 EMA is rounded once), or exactly ``params`` where ``warm``.
        Non-finite entries are only looked for with ``skip_nonfinite``; the count is
        a second read of the parameters (see :func:`_has_nonfinite`), which XLA:CPU
        does not fuse into the update (GPU fusion not measured here). The count is the
        only non-elementwise part: on sharded parameters it needs one scalar
        all-reduce per mesh axis, which ``count_nonfinite=False`` removes.
        """

        def leaf(p: jax.Array, e: jax.Array) -> jax.Array:
            if not _is_float(e):
                return jnp.asarray(p, e.dtype)
            copy = jnp.asarray(p, e.dtype)
            if self.alpha == 1.0:
                new = copy
            else:
                ct = jnp.promote_types(e.dtype, jnp.float32)
                e_c = e.astype(ct)
                new = (e_c + self.alpha * (jnp.asarray(p, ct) - e_c)).astype(e.dtype)
                if warm is not None:
                    new = jnp.where(warm, copy, new)
            if self.skip_nonfinite:
                new = jnp.where(jnp.isfinite(p), new, e)
            return new

        new_ema = jax.tree.map(leaf, params, ema)
        floats = [p for p in jax.tree.leaves(params) if _is_float(p) and p.size]
        if not (self.skip_nonfinite and self.count_nonfinite) or not floats:
            return new_ema, jnp.zeros((), jnp.int32)
        return new_ema, _has_nonfinite(floats).astype(jnp.int32)


def _has_nonfinite(leaves: list[jax.Array]) -> jax.Array:
    """Whether any entry of any of the (floating, non-empty) ``leaves`` is NaN or Inf.

    ``sum(p - p)`` is 0 when every entry is finite and NaN otherwise (``inf - inf``
    is NaN), with nothing to overflow. Two other forms are wrong or costly here:
    ``max(|p|)`` misses NaN on XLA:CPU, whose max of 4096 or more float32 entries
    ignores NaN; a variadic ``(max, min)`` reduce is exact but the SPMD partitioner
    does not split it, so a sharded leaf is all-gathered first. A sum is split into
    a local sum and one scalar all-reduce. tests/test_guard.py checks NaN, +Inf and
    -Inf on both sides of 4096 entries; tests/test_sharding.py the communication.
    """
    total = sum(jnp.sum(p - p, dtype=jnp.float32) for p in leaves)
    return ~jnp.isfinite(total)


def normalized_ema(
    *,
    ema_alpha: float,
    batch_size: float,
    max_epoch: float,
    update_period: int = 32,
    warmup_epochs: int = 0,
    steps_per_epoch: int | None = None,
    rule: _schedule.Rule = "linear",
    ema_dtype: Any = None,
    skip_nonfinite: bool = True,
    count_nonfinite: bool = True,
) -> NormalizedEma:
    r"""pycls's EMA of model weights, with a step size normalized by batch and schedule.

    Every ``update_period`` optimizer steps (counted within each epoch, so the first
    step of every epoch updates), the average moves towards the parameters:

    .. math::
      \alpha = \min\left(1, \text{ema\_alpha}\cdot\frac{\text{batch\_size}}
               {\text{max\_epoch}}\cdot\text{update\_period}\right),\qquad
      \text{ema} \leftarrow \text{ema} + \alpha\,(\text{params} - \text{ema}),

    and during the first ``warmup_epochs`` epochs it copies them (:math:`\alpha = 1`).
    The EMA's half-life is then about :math:`\ln 2\cdot\text{max\_epoch}/\text{ema\_alpha}`
    samples, a fixed fraction of training whatever the batch size, update period and
    schedule length. ``rule="exact"`` uses
    :math:`1 - (1 - \text{ema\_alpha}/\text{max\_epoch})^{\text{batch\_size}\cdot
    \text{update\_period}}` instead: the same history without the small-step
    approximation or the clamp.

    Args:
      ema_alpha: base rate per sample and epoch of schedule, pycls's ``EMA_ALPHA``
        (1e-5 for ImageNet, 2.5e-4 for CIFAR recipes).
      batch_size: global batch size, all devices together.
      max_epoch: schedule length in epochs.
      update_period: update every this many steps (0 turns the EMA off).
      warmup_epochs: epochs during which the EMA copies the parameters.
      steps_per_epoch: optimizer steps per epoch; needed for warmup and for the
        per-epoch cadence. None counts the cadence over the whole run.
      rule: "linear" (pycls) or "exact".
      ema_dtype: dtype of the EMA's floating leaves (e.g. ``jnp.float32`` for bf16
        parameters); None keeps each parameter's dtype.
      skip_nonfinite: NaN/Inf parameter entries keep their previous EMA value
        instead of poisoning it; such updates are counted in
        ``EmaState.nonfinite_updates``. The guard is elementwise: it keeps every
        EMA shard on its device with no communication.
      count_nonfinite: with ``skip_nonfinite``, keep that count. Counting reduces
        over all entries, so on sharded parameters it costs a scalar all-reduce per
        mesh axis at each EMA update; False drops the count (``nonfinite_updates``
        stays 0) and with it the update's only communication.

    Returns:
      A :class:`NormalizedEma` with ``alpha``, ``init(params)`` and
      ``update(params, state)``. Call ``update`` right after the optimizer step,
      inside the jitted train step.

    Raises:
      ValueError: a hyperparameter out of range, named with its value.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import ema_jax
      >>> ema = ema_jax.normalized_ema(ema_alpha=2.5e-4, batch_size=128,
      ...                              max_epoch=100, update_period=4)
      >>> round(ema.alpha, 6)
      0.00128
      >>> params = {"w": jnp.zeros(3)}
      >>> state = ema.init(params)
      >>> state = jax.jit(ema.update)({"w": jnp.ones(3)}, state)
      >>> state.ema["w"]
      Array([0.00128, 0.00128, 0.00128], dtype=float32)

    References:
      Radosavovic et al., pycls (``update_model_ema``), 2020;
      Busbridge et al., "How to Scale Your EMA", NeurIPS 2023.
    """
    return NormalizedEma(
        ema_alpha=ema_alpha,
        batch_size=batch_size,
        max_epoch=max_epoch,
        update_period=update_period,
        warmup_epochs=warmup_epochs,
        steps_per_epoch=steps_per_epoch,
        rule=rule,
        ema_dtype=ema_dtype,
        skip_nonfinite=skip_nonfinite,
        count_nonfinite=count_nonfinite,
    )

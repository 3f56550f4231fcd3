"""`Ema`: an EMA of a Flax NNX model's variables, a drop-in for `nnx.EMA`.

The wrapper only moves variables in and out (``nnx.state``, ``nnx.split``/``merge``,
``apply_to`` views); the pure transform (``ema_jax.ema`` or ``ema_jax.normalized_ema``)
does the math.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from typing import TypeVar

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx import filterlib
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

from ema_jax import _accumulation
from ema_jax._transform import EmaState
from ema_jax._trees import fit_problem
from ema_jax._trees import leaf_path

M = TypeVar("M")

_TRANSFORM_METHODS = ("init", "update", "settings")
_BAD_TRANSFORM = (
    "ema must be a transform from ema_jax.ema(...), ema_jax.normalized_ema(...) or"
    " ema_jax.bema(...), got {got}"
)
_CONSTANT_HINT = (
    " (for nnx.EMA's constant decay d, pass ema_jax.ema(ema_jax.schedules.constant(d)))"
)


class EmaCount(nnx.Variable):
    """An :class:`Ema`'s counters, ``step`` and ``nonfinite_updates``: int32 scalars.

    A type of their own, so that filters for the model's variables (``nnx.Param``,
    ``nnx.BatchStat``) never select them.
    """


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def _averaged(only: filterlib.Filter) -> filterlib.Filter:
    """What the EMA holds: ``only``, less RNG state (keys are no numbers to average)."""
    return nnx.All(only, nnx.Not(nnx.RngState))


def _describe(x: Any) -> str:
    text = repr(x)
    return f"{type(x).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"


def _check_model(model: Any, where: str) -> None:
    if not isinstance(model, nnx.Pytree):
        hint = ""
        if callable(getattr(model, "init", None)) and callable(getattr(model, "update", None)):
            hint = " (the order is Ema(model, ema))" if where == "Ema" else ""
        raise TypeError(
            f"{where}: model must be an NNX object (an nnx.Module or other nnx.Pytree),"
            f" got {_describe(model)}{hint}; for a plain pytree of arrays use the"
            " transform itself: ema.init(params), ema.update(params, state)"
        )


def _check_transform(ema: Any) -> None:
    if isinstance(ema, type) or not all(
        callable(getattr(ema, name, None)) for name in _TRANSFORM_METHODS
    ):
        hint = _CONSTANT_HINT if isinstance(ema, float) else ""
        raise TypeError(_BAD_TRANSFORM.format(got=_describe(ema)) + hint)
    try:
        hash(ema)
    except TypeError:
        raise TypeError(
            f"ema must be hashable (it is static under nnx.jit), got {_describe(ema)}"
        ) from None


def _numeric(value: Any) -> bool:
    dtype = getattr(value, "dtype", None)
    if dtype is None:
        if not isinstance(value, int | float | bool) or isinstance(value, complex):
            return False
        dtype = jnp.result_type(value)
    return bool(jnp.issubdtype(dtype, jnp.number) or jnp.issubdtype(dtype, jnp.bool_))


def _replicated_like(leaves: list[Any]) -> Any:
    """Puts a counter replicated on the variables' mesh, where they have one.

    A scalar made on one device would come back from the first sharded step replicated
    on the mesh, and jit would compile the step a second time for it.
    """
    for x in leaves:
        if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
            sharding = x.sharding
            if isinstance(sharding, NamedSharding):
                replicated = NamedSharding(sharding.mesh, PartitionSpec())
                return lambda counter: jax.device_put(counter, replicated)
    return lambda counter: counter


class Ema(nnx.Pytree):
    r"""An EMA of an NNX model's variables, updated by an ``ema_jax`` transform.

    A drop-in for ``nnx.EMA(model, decay, only=...)`` with the same ``update(model)``
    and ``apply_to(model)``, whose averaging is any ema_jax transform: pycls's
    normalized step size, warmup, an update period, an fp32 average of bf16 weights,
    the NaN/Inf guard. At each ``update`` the transform moves every selected floating
    variable towards the model's, :math:`e \leftarrow e + \alpha_t\,(v - e)`, with the
    :math:`\alpha_t` its schedule gives call :math:`t` (0 on calls it skips).

    What is averaged: ``only`` has ``nnx.EMA``'s meaning and default, ``...``, every
    :class:`nnx.Variable` of the model: ``nnx.Param``, ``nnx.BatchStat`` and any other
    variable type. Of those, floating variables are averaged and integer and bool ones
    copied at each EMA update (the core's rule: a counter stays exact, where
    ``nnx.EMA`` blends it as a float and truncates). RNG state (``nnx.RngState``:
    keys and counts) is never held: a key is no number to average (``nnx.EMA`` fails
    on it), and the view draws from the model's own streams. Variables outside
    ``only`` are left alone, as ``nnx.EMA`` leaves them.

    Migrating from ``nnx.EMA(model, decay)``: pass
    ``ema_jax.ema(schedules.constant(decay))``, the accurate lerp (within 2e-6 of the
    exact average after 30,000 float32 updates at decay 0.9999, where ``nnx.EMA``'s
    two-weight blend is 6e-5 off). Only to reproduce an ``nnx.EMA`` run bit for bit,
    pass ``ema_jax.ema(schedules.constant(decay, form="nnx"), nonfinite="propagate")``
    (see docs/migrating.md).

    Attributes:
      transform: the transform (static).
      filter: the ``only`` filter (static).
      params: the averages, an ``nnx.State`` of variables of the model's types and
        metadata (shardings included), ``ema_dtype`` when the transform has one.
      step: calls of ``update`` so far (an :class:`EmaCount`).
      nonfinite_updates: updates whose parameters had NaN/Inf, when the transform
        counts them (an :class:`EmaCount`).

    ``nnx.state(ema)`` is everything a checkpoint needs, ``step`` included. Evaluate
    with ``nnx.view(ema.apply_to(model), use_running_average=True)``: a view in
    training mode would write BatchNorm statistics into the EMA's variables.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from flax import nnx
      >>> import ema_jax
      >>> from ema_jax import nnx as ema_nnx
      >>> model = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
      >>> optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
      >>> ema = ema_nnx.Ema(model, ema_jax.ema(ema_jax.schedules.pycls(
      ...     ema_alpha=1e-3, batch_size=32, max_epoch=10, update_period=1)))
      >>> ema_model = ema.apply_to(model)  # evaluates with the averages, follows updates
      >>> @nnx.jit(donate_argnums=(0, 1, 2))
      ... def train_step(model, optimizer, ema, x, y):
      ...     grads = nnx.grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
      ...     optimizer.update(model, grads)
      ...     ema.update(model)  # after the optimizer step
      >>> train_step(model, optimizer, ema, jnp.ones((1, 2)), jnp.ones((1, 2)))
      >>> int(ema.ema_state.step), ema_model(jnp.ones((1, 2))).shape
      (1, (1, 2))
    """

    def __init__(
        self,
        model: Any,
        ema: Any,
        *,
        only: filterlib.Filter = ...,
        optimizer: Any = None,
    ) -> None:
        """Starts the EMA as a copy of the variables of ``model`` that ``only`` selects.

        Args:
          model: the NNX model (or any ``nnx.Pytree``) whose variables to average.
          ema: the transform, from ``ema_jax.ema(...)`` or ``ema_jax.normalized_ema(...)``.
          only: an NNX filter of the variables to average; ``...`` (default) is all
            but RNG state, as described above.
          optimizer: the ``nnx.Optimizer`` that trains ``model``. Under gradient
            accumulation (an ``optax.MultiSteps`` in it), every later
            ``update(model)`` then counts optimizer steps, not calls: it changes the
            EMA only on the calls where the optimizer applied (see :meth:`update`).
            The EMA holds references to the ``MultiSteps`` counters (``mini_step``
            and ``skip_state["should_skip"]``, shared with the optimizer, so they also
            appear in ``nnx.state(ema)``). Without a ``MultiSteps``, nothing changes.

        Raises:
          TypeError: ``model`` is no NNX object, ``ema`` no transform, ``only`` no
            filter, a selected variable holds no numeric array, or ``optimizer`` has
            no ``opt_state``.
          ValueError: ``only`` selects no variable; ``optimizer`` holds several
            ``optax.MultiStepsState`` or one whose skip state hides rejections.
        """
        _check_model(model, "Ema")
        _check_transform(ema)
        accumulation = _accumulation_counters(optimizer)
        try:
            filterlib.to_predicate(only)
        except (TypeError, ValueError):  # flax 0.12.8's own message fails to format
            raise TypeError(f"only must be an NNX filter, got {_describe(only)}") from None
        selected = nnx.state(model, _averaged(only))
        flat = nnx.to_flat_state(selected)
        if not len(flat):
            kinds = sorted({type(v).__name__ for _, v in nnx.to_flat_state(nnx.state(model))})
            raise ValueError(
                f"only={only!r} selects no variable of the model (it has"
                f" {', '.join(kinds) or 'no'} variables; RNG state is never averaged)"
            )
        for path, variable in flat:
            if not _numeric(variable.get_value()):
                raise TypeError(
                    f"the model's variable {leaf_path(path)} holds"
                    f" {_describe(variable.get_value())}, not a numeric array: leave it out"
                    f" of only={only!r}"
                )
        state = ema.init(nnx.as_pure(selected))
        place = _replicated_like(jax.tree.leaves(state.ema))
        self.transform = ema
        self.filter = only
        self.accumulation = nnx.data(accumulation)
        self.step = EmaCount(place(state.step))
        self.nonfinite_updates = EmaCount(place(state.nonfinite_updates))
        # The model's variable types and metadata (shardings) around the transform's copies;
        # several averages have a trailing axis the metadata does not describe: types only.
        wrap = (lambda v, x: type(v)(x)) if _several(ema) else (lambda v, x: v.copy(x))
        self.params = nnx.data(jax.tree.map(wrap, selected, state.ema, is_leaf=_is_variable))
        # A transform whose state has more buffers (ema_jax.bema: mean, theta0) keeps
        # them as variables too, in ``buffers``, so that nnx.state(ema) holds them.
        extra = [name for name in state._fields if name not in EmaState._fields]
        if extra:
            self.buffers = nnx.data(
                {
                    name: jax.tree.map(wrap, selected, getattr(state, name), is_leaf=_is_variable)
                    for name in extra
                }
            )

    @property
    def ema_state(self) -> Any:
        """The transform's :class:`~ema_jax.EmaState`: ``ema`` is a State of plain arrays.

        For a transform with more buffers (``ema_jax.bema``), its own state class.
        """
        fields = {
            "step": self.step.get_value(),
            "ema": nnx.as_pure(self.params),
            "nonfinite_updates": self.nonfinite_updates.get_value(),
        }
        buffers = getattr(self, "buffers", None)
        if buffers is None:
            return EmaState(**fields)
        pure = {name: nnx.as_pure(tree) for name, tree in buffers.items()}
        return self.transform.state_class(**fields, **pure)

    def update(self, model: Any, *, optimizer: Any = None, applied: Any = None) -> None:
        """Folds ``model``'s variables into the EMA; call right after the optimizer step.

        Inside ``nnx.jit`` with the EMA donated (with the model and optimizer, as a
        train step does: graph-mode ``nnx.jit`` returns every argument's variables and
        copies those not donated), its buffers are written in place; one compilation
        serves the whole run, and calls the schedule skips cost next to nothing.

        Gradient accumulation: with ``optax.MultiSteps(opt, every_k_schedule=k)`` the
        weights change on every k-th call only. Pass ``optimizer=optimizer`` (the
        ``nnx.Optimizer``, after its ``update``) and the EMA, its ``step`` included, is
        left unchanged on the calls where it did not apply (a ``lax.cond`` on the
        optimizer's state, no host sync), so that the EMA's cadence and warmup count
        optimizer steps: build it with ``batch_size`` the global batch of one
        optimizer step and ``steps_per_epoch`` in optimizer steps. A mini-step that
        ``should_skip_update_fn`` rejected does not count either (optax's
        ``skip_not_finite`` and ``skip_large_updates`` report it). Without a
        ``MultiSteps`` in the optimizer, every call updates. An EMA built with
        ``Ema(model, ema, optimizer=optimizer)`` does the same on a plain
        ``update(model)``: the optimizer is given once, and each call reads its
        counters.

        Args:
          model: the model, after the optimizer step.
          optimizer: the ``nnx.Optimizer`` (anything with ``opt_state``) whose update
            this follows, to update only when it applied; optional.
          applied: instead of ``optimizer``, whether the weights changed: a Python
            bool or a bool scalar array (traced is fine); None: always.

        Raises:
          TypeError: ``model`` is no NNX object, ``optimizer`` has no ``opt_state``,
            ``applied`` is no bool scalar, or both are given.
          ValueError: ``model``'s variables do not match the EMA's (the first
            differing path is named), before any tracing; ``optimizer`` holds several
            ``optax.MultiStepsState`` or one whose skip state hides rejections.

        Example:
          >>> import jax.numpy as jnp, optax
          >>> from flax import nnx
          >>> import ema_jax
          >>> from ema_jax import nnx as ema_nnx
          >>> model = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
          >>> tx = optax.MultiSteps(optax.sgd(0.1), every_k_schedule=4)  # 4 micro-batches
          >>> optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
          >>> ema = ema_nnx.Ema(model, ema_jax.ema(ema_jax.schedules.pycls(
          ...     ema_alpha=1e-3, batch_size=32, max_epoch=10, update_period=1)))
          >>> @nnx.jit(donate_argnums=(0, 1, 2))
          ... def train_step(model, optimizer, ema, x, y):
          ...     grads = nnx.grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
          ...     optimizer.update(model, grads)
          ...     ema.update(model, optimizer=optimizer)  # only when the weights changed
          >>> for _ in range(8):
          ...     train_step(model, optimizer, ema, jnp.ones((8, 2)), jnp.ones((8, 2)))
          >>> int(optimizer.step[...]), int(ema.ema_state.step)
          (8, 2)
        """
        _check_model(model, "Ema.update")
        current = self._matching(model, "update")
        counters = self.accumulation if optimizer is None and applied is None else None
        applied = _applied(optimizer, applied)
        if counters is not None:  # built with optimizer=: its counters say whether it applied
            applied = _applied_from(counters)
        if applied is False:
            return
        params = nnx.as_pure(current)
        if applied is True:
            state = self.transform.update(params, self.ema_state)
        else:
            state = jax.lax.cond(applied, self.transform.update, _unchanged, params, self.ema_state)
        self.step.set_value(state.step)
        self.nonfinite_updates.set_value(state.nonfinite_updates)
        trees = {"ema": self.params, **getattr(self, "buffers", {})}
        for name, tree in trees.items():
            targets = jax.tree.leaves(tree, is_leaf=_is_variable)
            for variable, value in zip(targets, jax.tree.leaves(getattr(state, name)), strict=True):
                variable.set_value(value)

    def apply_to(self, model: M, which: int | str | None = None) -> M:
        """A view of ``model`` that evaluates with the averages and follows later updates.

        With several averages (``ema_jax.ema((s1, s2, ...))``), ``which`` (an index or
        a name) picks one, and the view holds a copy of it: call ``apply_to`` again
        after later updates.

        The view holds the EMA's own variables where the EMA has them and ``model``'s
        everywhere else (RNG streams, variables outside ``only``); nothing is copied.
        Its modules are new objects: ``nnx.view(ema.apply_to(model),
        use_running_average=True)`` puts it in evaluation mode and leaves ``model`` be.

        Raises:
          TypeError: ``model`` is no NNX object.
          ValueError: ``model`` is not shaped like the model the EMA was built from.
        """
        _check_model(model, "Ema.apply_to")
        current = self._matching(model, "apply_to")
        graphdef, state = nnx.split(model)
        if not _several(self.transform):
            return nnx.merge(graphdef, nnx.merge_state(state, self.params))
        chosen = self.transform.average(nnx.as_pure(self.params), which)
        averages = jax.tree.map(lambda v, x: v.copy(x), current, chosen, is_leaf=_is_variable)
        return nnx.merge(graphdef, nnx.merge_state(state, averages))

    def _matching(self, model: Any, method: str) -> nnx.State:
        """``model``'s averaged variables, after checking they match the EMA's."""
        current = nnx.state(model, _averaged(self.filter))
        problem = fit_problem(
            {leaf_path(path): v for path, v in nnx.to_flat_state(current)},
            {leaf_path(path): e for path, e in nnx.to_flat_state(self.params)},
            got_name="the model",
            want_name="the EMA",
            stacked=_several(self.transform),
            kind=_is_float,
            same_type=True,
        )
        if problem:
            raise ValueError(
                f"Ema.{method}: model does not match the EMA's variables: {problem}; is it"
                " another model?"
            )
        return current


def _accumulation_counters(optimizer: Any) -> dict[str, nnx.Variable] | None:
    """The optimizer's ``MultiSteps`` counters that tell whether a call applied, or None.

    ``mini_step`` and, with a ``should_skip_update_fn``, ``skip_state["should_skip"]``:
    the optimizer's own variables (``nnx.Optimizer.update`` writes them in place).
    """
    if optimizer is None:
        return None
    opt_state = getattr(optimizer, "opt_state", None)
    if opt_state is None:
        raise TypeError(
            "Ema: optimizer must be the nnx.Optimizer that trains the model (with an"
            f" opt_state), got {_describe(optimizer)}"
        )
    multi = _accumulation.multi_steps_state(opt_state, "Ema")
    if multi is None:
        return None
    _accumulation.applied_after(nnx.as_pure(multi), "Ema")  # raises for a hidden skip state
    counters = {"mini_step": multi.mini_step}
    if isinstance(multi.skip_state, Mapping) and "should_skip" in multi.skip_state:
        counters["should_skip"] = multi.skip_state["should_skip"]
    if not all(isinstance(v, nnx.Variable) for v in counters.values()):
        raise TypeError(
            "Ema: optimizer.opt_state must hold nnx variables (an nnx.Optimizer's), got"
            f" {_describe(multi.mini_step)} for its MultiSteps mini_step"
        )
    return counters


def _applied_from(counters: dict[str, nnx.Variable]) -> jax.Array:
    """Whether the optimizer's last call applied: ``mini_step == 0`` and not rejected."""
    applied = jnp.asarray(counters["mini_step"].get_value()) == 0
    if "should_skip" in counters:
        applied = applied & ~jnp.asarray(counters["should_skip"].get_value(), bool)
    return applied


def _unchanged(params: Any, state: EmaState) -> EmaState:
    del params
    return state


def _applied(optimizer: Any, applied: Any) -> Any:
    """``Ema.update``'s ``applied``: True, False, or a traced bool scalar."""
    if optimizer is not None:
        if applied is not None:
            raise TypeError(
                "Ema.update takes optimizer= or applied=, not both: the optimizer's state"
                " already says whether it applied"
            )
        opt_state = getattr(optimizer, "opt_state", None)
        if opt_state is None:
            raise TypeError(
                "Ema.update: optimizer must be the nnx.Optimizer whose update this follows"
                f" (with an opt_state), got {_describe(optimizer)}"
            )
        multi = _accumulation.multi_steps_state(nnx.as_pure(opt_state), "Ema.update")
        return True if multi is None else _accumulation.applied_after(multi, "Ema.update")
    if applied is None or isinstance(applied, bool):
        return applied is not False
    try:
        ok = jnp.shape(applied) == () and jnp.result_type(applied) == jnp.bool_
    except TypeError:
        ok = False
    if not ok:
        raise TypeError(
            "Ema.update: applied must be a bool or a bool scalar array (whether the"
            f" optimizer changed the weights), got {_describe(applied)}"
        )
    return applied


def _several(transform: Any) -> bool:
    return bool(getattr(transform, "several", False))


def _is_float(variable: nnx.Variable) -> bool:
    return bool(jnp.issubdtype(jnp.result_type(variable.get_value()), jnp.floating))

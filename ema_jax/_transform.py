"""The one EMA transform: ``ema(schedule)``, its state, and the blend kernel.

Pure JAX: this module imports nothing from Flax, orbax or the diagnostics, so that
what runs inside a jitted train step is all here.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any
from typing import Literal
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ema_jax import _memory
from ema_jax import _rounding
from ema_jax import _trees
from ema_jax import _validate
from ema_jax import schedules
from ema_jax.schedules import REGISTRY
from ema_jax.schedules import Plan
from ema_jax.schedules import Schedule

PyTree = Any
Nonfinite = Literal["skip", "skip_and_count", "propagate"]
NONFINITE: tuple[str, ...] = ("skip", "skip_and_count", "propagate")
Rounding = Literal["nearest", "stochastic"]
ROUNDING: tuple[str, ...] = ("nearest", "stochastic")


class EmaState(NamedTuple):
    """The state of an :func:`ema` transform: arrays only.

    Attributes:
      step: update calls so far (optimizer steps); saturates at ``2**31 - 1``
        instead of wrapping (past it, every call does what the call at step
        ``2**31 - 1`` did: the cadence needs an exact count, and an int32 holds
        68 years of training at 1 step per second).
      ema: the moving average, a pytree shaped like the parameters.
      nonfinite_updates: with ``nonfinite="skip_and_count"``, the updates at which
        some parameter entry was NaN or Inf (those entries kept their previous EMA
        value; so do entries whose blend overflowed the EMA's dtype, uncounted).
        Always 0 with the other settings.
    """

    step: jax.Array  # shape=(), int32
    ema: PyTree  # like params; real floating leaves in ema_dtype when given
    nonfinite_updates: jax.Array  # shape=(), int32


@dataclasses.dataclass(frozen=True)
class Ema:
    """An EMA of a parameter pytree under a schedule; build it with :func:`ema`.

    Immutable and hashable: the schedule and the settings are static Python values,
    so it can sit in a jitted function's closure or a flax
    ``struct.field(pytree_node=False)``.
    """

    schedule: Schedule | tuple[Schedule, ...]
    ema_dtype: np.dtype | None = None
    nonfinite: Nonfinite = "skip"
    names: tuple[str, ...] | None = None
    """With several schedules: a name for each average (None: they go by index)."""
    rounding: Rounding = "nearest"
    """How a blend is rounded to an EMA leaf narrower than float32 (see :func:`ema`)."""
    memory_kind: str | None = None
    """Where the EMA's leaves live ("pinned_host": host memory); None: the parameters'."""

    def __post_init__(self) -> None:
        several = isinstance(self.schedule, tuple)
        for s in self.schedules:
            if not isinstance(s, Schedule):
                hint = ""
                if isinstance(s, str):  # a family's name: say how to build the schedule
                    known = s in REGISTRY and hasattr(schedules, s)
                    hint = (
                        f"; a name is not a schedule: build one, e.g. schedules.{s}(...)"
                        if known
                        else f"; a name is not a schedule, and the families are {list(REGISTRY)}"
                    )
                raise TypeError(
                    "schedule must be a schedule from ema_jax.schedules (e.g."
                    f" schedules.constant(0.999)) or a tuple of them, got {s!r}{hint}"
                )
        if several and not self.schedule:
            raise ValueError("schedule must hold at least one schedule, got ()")
        if self.names is not None:
            names = tuple(self.names)
            count = len(self.schedules)
            if not several or len(names) != count or len(set(names)) != len(names):
                raise ValueError(
                    f"names must be distinct, one per schedule, got {self.names!r} for"
                    f" {count} schedule(s)"
                )
            object.__setattr__(self, "names", names)
        if self.ema_dtype is not None:
            try:
                dtype = _validate.resolve_dtype(self.ema_dtype, "ema_dtype")
            except ValueError:
                raise ValueError(
                    f"ema_dtype must be a floating dtype or None, got {self.ema_dtype!r}"
                ) from None
            object.__setattr__(self, "ema_dtype", dtype)
        _validate.check_choice("nonfinite", self.nonfinite, NONFINITE)
        _validate.check_choice("rounding", self.rounding, ROUNDING)
        if self.memory_kind is not None:
            _memory.check_memory_kind(self.memory_kind)
        wide = self.ema_dtype is not None and not _rounding.is_narrow(self.ema_dtype)
        if self.rounding == "stochastic" and wide:
            assert self.ema_dtype is not None
            raise ValueError(
                "rounding='stochastic' rounds to an EMA narrower than float32, but"
                f" ema_dtype={self.ema_dtype.name!r} holds every blend's float32 value"
                " as it is: pass ema_dtype=jnp.bfloat16 (or float16), or rounding='nearest'"
            )

    @property
    def several(self) -> bool:
        """Whether this EMA keeps several averages (a trailing axis on every EMA leaf)."""
        return isinstance(self.schedule, tuple)

    @property
    def schedules(self) -> tuple[Schedule, ...]:
        """The schedules, one per average."""
        return self.schedule if isinstance(self.schedule, tuple) else (self.schedule,)

    @property
    def alpha(self) -> float | None:
        """The step size of every averaging update when it is a constant, else None."""
        return None if self.several else self._one().static_alpha

    @property
    def update_period(self) -> int:
        """Update calls between EMA updates (0: never)."""
        return self._one().update_period

    def _one(self) -> Schedule:
        if isinstance(self.schedule, tuple):
            raise AttributeError(
                "this EMA keeps several averages: ask ema.schedules[k] for one schedule's"
                " alpha or update_period"
            )
        return self.schedule

    def index(self, which: int | str) -> int:
        """The position of average ``which`` (its index, or its name)."""
        count = len(self.schedules)
        if isinstance(which, str):
            if self.names is None or which not in self.names:
                raise ValueError(f"which must be one of the names {self.names}, got {which!r}")
            return self.names.index(which)
        if isinstance(which, bool) or not isinstance(which, int) or not -count <= which < count:
            raise ValueError(f"which must be an index below {count} or a name, got {which!r}")
        return which % count

    def average(self, ema: PyTree, which: int | str | None = None) -> PyTree:
        """One average out of ``EmaState.ema``: the tree to evaluate with.

        With a single schedule, ``ema`` itself (``which`` must be None or 0). With
        several, the ``which``-th (index or name) along every leaf's trailing axis.

        Example:
          >>> import jax.numpy as jnp
          >>> import ema_jax
          >>> from ema_jax import schedules
          >>> ema = ema_jax.ema({"fast": schedules.constant(0.5),
          ...                    "slow": schedules.constant(0.9)})
          >>> state = ema.update({"w": jnp.ones(2)}, ema.init({"w": jnp.zeros(2)}))
          >>> state.ema["w"].shape, ema.average(state.ema, "slow")["w"]
          ((2, 2), Array([0.1, 0.1], dtype=float32))
        """
        if not self.several:
            if which not in (None, 0):
                raise ValueError(f"this EMA keeps one average, got which={which!r}")
            return ema
        if which is None:
            raise ValueError(
                f"this EMA keeps {len(self.schedules)} averages: pick one with which="
                f"(an index{' or one of ' + repr(self.names) if self.names else ''})"
            )
        k = self.index(which)
        return jax.tree.map(lambda e: e[..., k], ema)

    @property
    def skip_nonfinite(self) -> bool:
        return self.nonfinite != "propagate"

    @property
    def count_nonfinite(self) -> bool:
        return self.nonfinite == "skip_and_count"

    def settings(self) -> dict[str, Any]:
        """This EMA's configuration as a JSON-ready dict (stored with checkpoints).

        ``{"schedule": {"name": ..., <hyperparameters>}, "ema_dtype": str | None,
        "nonfinite": str, "rounding": str}``: the schedule, the dtype and the rounding
        decide the numbers, the guard only what happens to NaN/Inf.
        """
        dtype = None if self.ema_dtype is None else self.ema_dtype.name
        schedule: Any = (
            [s.settings() for s in self.schedules] if self.several else (self._one().settings())
        )
        if self.names is not None:
            schedule = dict(zip(self.names, schedule, strict=True))
        return {
            "schedule": schedule,
            "ema_dtype": dtype,
            "nonfinite": self.nonfinite,
            "rounding": self.rounding,
        }

    def explain(self, **kwargs: Any) -> Any:
        """What this EMA's schedule means: :func:`ema_jax.explain` of it, in its dtype.

        Keyword arguments go to :func:`ema_jax.explain` (``dataset_size``,
        ``total_steps``, ``dtype``). The diagnostics are imported here, on demand, so
        that the transform itself never loads them. With several averages the report
        holds one per average (``report[k]``, ``report["name"]``).

        Example:
          >>> import ema_jax
          >>> from ema_jax import schedules
          >>> ema = ema_jax.ema(schedules.pycls(ema_alpha=2.5e-4, batch_size=128,
          ...                                   max_epoch=100, steps_per_epoch=390))
          >>> report = ema.explain()
          >>> report.alpha == ema.alpha, report.updates_per_epoch
          (True, 13)
        """
        from ema_jax._explain import explain  # the diagnostics' front door, on demand

        return explain(self, **kwargs)

    def init(self, params: PyTree) -> EmaState:
        """Starts the EMA as a copy of ``params`` (real floating leaves cast to ``ema_dtype``).

        The copy owns its buffers, so donating ``params`` later never frees the EMA.

        Warns ``ema_jax.EmaPrecisionWarning`` when the schedule's smallest step size is
        too small for an EMA leaf's dtype under round-to-nearest (the check of
        :func:`ema_jax.explain`): a bf16 EMA at decay 0.9999 would never move.

        Raises:
          TypeError: a leaf that is not a numeric array.
          ValueError: a concrete leaf with NaN/Inf entries (unless
            ``nonfinite="propagate"``), or with values beyond ``ema_dtype``'s range.
        """
        guarded = self.nonfinite != "propagate"
        dtypes = set()
        for path, p in jax.tree_util.tree_flatten_with_path(params)[0]:
            name = jax.tree_util.keystr(path)
            if not isinstance(p, _trees.ARRAY_TYPES) or not _trees.is_numeric(p):
                raise TypeError(
                    f"params{name} must be a numeric array, got {type(p).__name__} {p!r:.60}"
                )
            if _trees.is_averaged(p):
                _trees.check_initial_value(name, p, self._leaf_dtype(p), guarded)
                if jnp.issubdtype(_trees.dtype_of(p), jnp.floating):
                    dtypes.add(np.dtype(self._leaf_dtype(p) or _trees.dtype_of(p)))
        narrow_ok = self.rounding == "stochastic"  # narrow leaves round stochastically
        rounded = [d for d in dtypes if not (narrow_ok and _rounding.is_narrow(d))]
        message = _validate.stall_message(self.schedules, rounded)
        if message is not None:
            warnings.warn(message, _validate.EmaPrecisionWarning, stacklevel=2)

        def copy_leaf(p: Any) -> jax.Array:
            copy = jnp.array(p, dtype=self._leaf_dtype(p), copy=True)
            if self.several:  # one copy per average, along a trailing axis
                copy = jnp.repeat(copy[..., None], len(self.schedules), axis=-1)
            return copy

        ema = jax.tree.map(copy_leaf, params)
        kind = self.memory_kind
        if kind is not None:
            ema = jax.tree.map(lambda e, p: _memory.place(e, p, kind), ema, params)
        # Two distinct buffers: donating a state whose fields share one fails. On a
        # mesh the counters are replicated over it, as a jitted update returns them, so
        # that the update compiles once, not again on its own output.
        return EmaState(
            step=_memory.replicated(jnp.zeros((), jnp.int32), params),
            ema=ema,
            nonfinite_updates=_memory.replicated(jnp.zeros((), jnp.int32), params),
        )

    def update(self, params: PyTree, state: EmaState) -> EmaState:
        """Folds ``params`` into the EMA; call once after every optimizer step.

        Call number ``i = state.step`` asks the schedule whether to update and with
        which step size ``alpha``; if so, averaged leaves become
        ``ema + alpha * (params - ema)`` (or, for ``schedules.constant(form="nnx")``,
        flax's ``decay * ema + (1 - decay) * params``), or exactly ``params`` where the
        schedule copies; integer and bool leaves are copied. Other calls leave the
        EMA untouched and cost next to nothing (``lax.cond``). ``step`` always
        advances.
        """
        if not isinstance(state, EmaState):
            raise TypeError(
                f"state must be the EmaState that init returned, got {type(state).__name__}"
                " (the order is update(params, state))"
            )
        step_dtype = _trees.dtype_of(state.step)
        if jnp.shape(state.step) != () or not jnp.issubdtype(step_dtype, jnp.integer):
            raise TypeError(
                "state.step must be an integer scalar (int32 from init), got shape"
                f" {jnp.shape(state.step)} and dtype {step_dtype}"
            )
        params = _trees.check_params_match(params, state.ema, stacked=self.several)
        if self.memory_kind is not None:
            _memory.check_placed(state.ema, self.memory_kind, "state.ema")
        step = _safe_increment(state.step)
        i = jnp.asarray(state.step, jnp.int32)
        plan = self._plan(i)
        if plan.update is False:
            return state._replace(step=step)

        def fold(params: PyTree, ema: PyTree) -> tuple[PyTree, jax.Array]:
            return self._fold(params, ema, plan, i)

        def skip(params: PyTree, ema: PyTree) -> tuple[PyTree, jax.Array]:
            return ema, jnp.zeros((), jnp.int32)

        if plan.update is True:
            ema, bad = fold(params, state.ema)
        else:  # One two-way cond: XLA:CPU runs a three-way switch several times slower.
            ema, bad = jax.lax.cond(plan.update, fold, skip, params, state.ema)
        return EmaState(step=step, ema=ema, nonfinite_updates=state.nonfinite_updates + bad)

    def _plan(self, i: jax.Array) -> Plan:
        """The call's plan; for several averages, vectors along the trailing axis.

        An average whose schedule skips this call gets ``alpha = 0`` (and a keep weight
        of 1): ``ema + 0 * (p - ema)`` is ``ema`` exactly, so one pass serves all.
        """
        if not self.several:
            return self._one().plan(i)
        plans = [s.plan(i) for s in self.schedules]
        if all(p.update is False for p in plans):
            return Plan(False, 0.0, False)
        updates = jnp.stack([jnp.asarray(p.update, bool) for p in plans])
        alpha = jnp.where(updates, jnp.stack([jnp.asarray(p.alpha, float) for p in plans]), 0)
        copy: bool | jax.Array = False
        if any(p.copy is not False for p in plans):
            copy = updates & jnp.stack([jnp.asarray(p.copy, bool) for p in plans])
        keep = None
        if any(p.keep is not None for p in plans):
            kept = [np.float32(np.nan if p.keep is None else p.keep) for p in plans]
            keep = jnp.where(updates, jnp.asarray(kept), 1.0)  # NaN: the lerp form's (below)
        any_update = True if any(p.update is True for p in plans) else jnp.any(updates)
        return Plan(any_update, alpha, copy, keep, updates)

    def _leaf_dtype(self, p: Any) -> np.dtype | None:
        """``ema_dtype`` for real floating leaves; None (the leaf's own) otherwise."""
        real_float = jnp.issubdtype(_trees.dtype_of(p), jnp.floating)
        return self.ema_dtype if self.ema_dtype is not None and real_float else None

    def _fold(
        self, params: PyTree, ema: PyTree, plan: Plan, i: jax.Array
    ) -> tuple[PyTree, jax.Array]:
        """One EMA update: returns the new EMA, and 1 if the count saw NaN/Inf parameters.

        Averaged leaves are blended in at least fp32 and rounded once to the EMA's
        dtype (a bf16 EMA); where the plan copies, the result is exactly ``params``.
        The guard checks the result, elementwise in the same pass: NaN/Inf parameters
        and blends that overflow the EMA's dtype both leave the entry at its previous
        value. Only the count reduces over all entries (a scalar all-reduce per mesh
        axis on sharded parameters); it reads the parameters, not the result, because
        XLA:CPU materializes a parameter-sized temporary for a reduction over the
        blend (tests/test_structure.py), so it counts NaN/Inf parameters, not overflows.

        With ``rounding="stochastic"``, blends into leaves narrower than float32 are
        rounded stochastically, with noise from (call ``i``, leaf index, element index):
        the same for every average of a leaf, so that each is what its schedule alone
        gives. Copies stay exact (round to nearest).
        """
        static_copy = plan.copy is True or (type(plan.alpha) is float and plan.alpha == 1.0)
        all_kept = all(s._keep() is not None for s in self.schedules)  # no lerp form needed
        counted: list[jax.Array] = []  # the count reads the parameters (see below)

        def leaf(index: int, p: jax.Array, e: jax.Array) -> jax.Array:
            if self.memory_kind in _memory.HOST_KINDS:  # through device memory, leaf by leaf
                return _memory.to_host(blend_leaf(index, p, _memory.to_device(e)))
            return blend_leaf(index, p, e)

        def blend_leaf(index: int, p: jax.Array, e: jax.Array) -> jax.Array:
            if self.several:
                p = p[..., None]  # one read of the parameters for every average
            copy = jnp.asarray(p, e.dtype)
            if not _trees.is_averaged(e):
                return copy if plan.applied is None else jnp.where(plan.applied, copy, e)
            if static_copy:
                new = copy
            else:
                ct = jnp.promote_types(e.dtype, jnp.float32)
                e_c, p_c = e.astype(ct), jnp.asarray(p, ct)
                if plan.keep is None:
                    blend = e_c + plan.alpha * (p_c - e_c)
                else:  # flax nnx.EMA's operation order, bit for bit
                    blend = plan.keep * e_c + plan.alpha * p_c
                    if not all_kept:  # several averages, some blending in the lerp form
                        lerp = e_c + plan.alpha * (p_c - e_c)
                        blend = jnp.where(jnp.isnan(plan.keep), lerp, blend)
                if self.rounding == "stochastic" and _rounding.is_narrow(e.dtype):
                    bits = _rounding.noise_bits(i, index, jnp.shape(p))  # p: (..., 1) if several
                    new = _rounding.round_stochastic(blend, e.dtype, bits)
                else:
                    new = blend.astype(e.dtype)
                if plan.copy is not False:
                    new = jnp.where(plan.copy, copy, new)
            if self.nonfinite == "propagate":
                return new
            if e.size:
                counted.append(p)
            # e + 0 is e (a -0.0 comes back as +0.0), but neither XLA (behind the barrier)
            # nor LLVM folds it: selecting e itself into the donated buffer becomes a
            # masked store (vmaskmovps), slow on x86; this way the loop stores every entry,
            # with one vector add more than the unguarded blend's besides the test and the
            # select (benchmarks/README.md).
            zero = jax.lax.optimization_barrier(jnp.zeros((), e.dtype))
            return jnp.where(jnp.isfinite(new), new, e + zero)

        p_leaves = jax.tree.leaves(params)
        e_leaves, treedef = jax.tree.flatten(ema)
        new_ema = jax.tree.unflatten(
            treedef,
            [leaf(k, p, e) for k, (p, e) in enumerate(zip(p_leaves, e_leaves, strict=True))],
        )
        if self.nonfinite != "skip_and_count" or not counted:
            return new_ema, jnp.zeros((), jnp.int32)
        return new_ema, _trees.has_nonfinite(counted).astype(jnp.int32)


def _safe_increment(count: jax.Array) -> jax.Array:
    """``count + 1``, staying at the integer dtype's maximum: ``optax.safe_increment``.

    Written out so that importing the transform does not import optax (0.3 s).
    """
    top = jnp.array(jnp.iinfo(_trees.dtype_of(count)).max, _trees.dtype_of(count))
    return jnp.where(count < top, count + jnp.ones_like(top), top)


def ema(
    schedule: Schedule | Sequence[Schedule] | Mapping[str, Schedule],
    *,
    ema_dtype: Any = None,
    nonfinite: Nonfinite = "skip",
    rounding: Rounding = "nearest",
    memory_kind: str | None = None,
) -> Ema:
    r"""An exponential moving average of model weights under any schedule.

    At update call ``i`` (0-based), the schedule decides whether the EMA moves and
    with which step size :math:`\alpha_i`:

    .. math::
      \text{ema} \leftarrow \text{ema} + \alpha_i\,(\text{params} - \text{ema}),

    a copy of the parameters where the schedule says so (warmup). See
    :mod:`ema_jax.schedules` for pycls's, constant, power and TF warmups, EDM's
    half-life, EDM2's power function and a half-life as a share of training.

    Several averages in one pass: pass a tuple of schedules, or a dict naming them.
    Every EMA leaf then has a trailing axis, one entry per average; one update reads
    the parameters once for all of them (``1 + 2K`` parameter-sized streams for K
    averages instead of ``3K``), and each average is exactly what ``ema(schedule_k)``
    alone would give. :meth:`Ema.average` picks one out to evaluate with.

    Args:
      schedule: when and how far the EMA moves, from :mod:`ema_jax.schedules`; or a
        tuple of them, or a dict ``{name: schedule}``, for several averages.
      ema_dtype: dtype of the EMA's real floating leaves (e.g. ``jnp.float32`` for
        bf16 parameters; "bf16"-style names work too); None keeps each parameter's.
      nonfinite: what happens where an update's result is NaN or Inf (NaN/Inf
        parameters, or a blend that overflows the EMA's dtype). ``"skip"`` (default)
        keeps the previous EMA value there: elementwise, in the same pass, no
        communication. ``"skip_and_count"`` also counts the updates whose parameters
        had NaN/Inf in ``EmaState.nonfinite_updates``, at the cost of a reduction over all entries
        (a scalar all-reduce per mesh axis on sharded parameters, and a second pass on
        XLA:CPU). ``"propagate"`` lets them in.
      rounding: how a blend (computed in float32) is rounded to an EMA leaf narrower
        than float32 (bfloat16, float16: from ``ema_dtype``, or, with
        ``ema_dtype=None``, low-precision parameters). ``"nearest"`` (default) rounds
        to nearest, which loses every step smaller than half a unit in the last
        place: a bfloat16 EMA at decay 0.9999 never moves. ``"stochastic"`` rounds up
        with probability equal to the remainder's share of the gap, so the stored EMA
        is unbiased and small steps add up. The noise is a hash of (update call, leaf
        index, element index): reproducible, the same after a resume, no key in the
        state. It needs an EMA narrower than float32 (a ValueError for an
        ``ema_dtype`` of float32 or wider; with ``ema_dtype=None``, float32 and wider
        leaves round as before). Copies (warmup) are exact either way.
      memory_kind: where the EMA's leaves live: ``"pinned_host"`` keeps them in host
        memory (the accelerator then holds none of it between updates), with the
        parameters' sharding otherwise; the update moves each leaf to device memory,
        blends it and moves it back, leaf by leaf, inside the jitted step (the same
        numbers, bit for bit). None (default) or ``"device"``: the parameters' memory.

    Returns:
      An :class:`Ema` with ``init(params)`` and ``update(params, state)``. Call
      ``update`` right after the optimizer step, inside the jitted train step, with
      the state donated (``jax.jit(ema.update, donate_argnums=1)``): the EMA is
      written in place.

    Raises:
      TypeError: ``schedule`` is not a schedule.
      ValueError: a bad ``ema_dtype``, ``nonfinite`` or ``rounding``, named with its
        value; ``rounding="stochastic"`` with an ``ema_dtype`` of float32 or wider; a
        ``memory_kind`` the backend lacks (the message lists those it has).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import ema_jax
      >>> from ema_jax import schedules
      >>> ema = ema_jax.ema(schedules.constant(0.9))
      >>> state = ema.init({"w": jnp.zeros(3)})
      >>> state = jax.jit(ema.update, donate_argnums=1)({"w": jnp.ones(3)}, state)
      >>> state.ema["w"]
      Array([0.1, 0.1, 0.1], dtype=float32)
    """
    names = None
    if isinstance(schedule, Mapping):
        names, schedule = tuple(schedule), tuple(schedule.values())
    elif isinstance(schedule, Sequence) and not isinstance(schedule, str):
        schedule = tuple(schedule)  # a str is a Sequence too: left whole for the message
    return Ema(
        schedule=schedule,
        ema_dtype=ema_dtype,
        nonfinite=nonfinite,
        names=names,
        rounding=rounding,
        memory_kind=memory_kind,
    )

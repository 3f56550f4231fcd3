"""Checks and reductions over parameter trees, shared by the transform: pure JAX."""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any

ARRAY_TYPES = (jax.Array, np.ndarray, np.generic, int, float, complex)


def dtype_of(x: Any) -> np.dtype:
    return x.dtype if hasattr(x, "dtype") else np.result_type(x)


def is_numeric(x: Any) -> bool:
    dtype = dtype_of(x)
    return bool(jnp.issubdtype(dtype, jnp.number) or jnp.issubdtype(dtype, jnp.bool_))


def is_averaged(x: Any) -> bool:
    """Floating and complex leaves are averaged; integer and bool leaves are copied."""
    return bool(jnp.issubdtype(dtype_of(x), jnp.inexact))


def key_name(key: Any) -> str:
    """One path entry as orbax names it: dict keys, attribute names and indices alike."""
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def leaf_path(path: tuple[Any, ...]) -> str:
    """A leaf's path as ema_jax spells it everywhere: ``params.Dense_0.kernel``.

    The names orbax gives a checkpoint's leaves (a tuple's entries by index, a
    dataclass's by field), so that messages, checksum records and metadata agree.

    Example:
      >>> import jax
      >>> flat, _ = jax.tree_util.tree_flatten_with_path({"layers": [{"w": 0.0}]})
      >>> leaf_path(flat[0][0])
      'layers.0.w'
    """
    return ".".join(key_name(k) for k in path)


def leaves_by_path(tree: PyTree, is_leaf: Any = None) -> dict[str, Any]:
    """``{"params.Dense_0.kernel": leaf}`` in flattening order; None subtrees have no leaves.

    Orbax stores a tuple as a list, a NamedTuple or dataclass as a dict of its fields,
    so the dotted names of a target and of its checkpoint's metadata agree.
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    return {leaf_path(path): leaf for path, leaf in flat}


def shape_of(x: Any) -> tuple[int, ...]:
    """The shape of an array, a ``ShapeDtypeStruct``, orbax metadata, a ``{"shape": ...}``
    record, an NNX variable or a scalar."""
    if isinstance(x, Mapping):
        return tuple(int(n) for n in x["shape"])
    if hasattr(x, "get_value"):  # an NNX variable
        x = x.get_value()
    shape = getattr(x, "shape", None)
    return tuple(np.shape(x) if shape is None else shape)


def _dtype_name(x: Any) -> str:
    if isinstance(x, Mapping):
        return str(x["dtype"])
    if hasattr(x, "get_value"):
        x = x.get_value()
    return np.dtype(dtype_of(x)).name


def _possessive(name: str) -> str:
    return f"{name}'" if name.endswith("s") else f"{name}'s"


def fit_problem(
    got: Mapping[str, Any],
    want: Mapping[str, Any],
    *,
    got_name: str,
    want_name: str,
    stacked: bool = False,
    kind: Callable[[Any], bool] | None = None,
    same_type: bool = False,
    ordered: bool = False,
) -> str | None:
    """Whether tree ``got`` fits tree ``want``: None, or what differs at the first leaf.

    The one tree-fit rule of ema_jax (the transform's parameters, NNX variables,
    checkpoints, post-hoc snapshots). ``got`` and ``want`` map :func:`leaf_path` to
    a leaf (an array, a ``ShapeDtypeStruct``, orbax metadata, a ``{"shape", "dtype"}``
    record, an NNX variable). Walking ``want`` in order, the first leaf that is not in
    ``got`` (structure), has another shape, another type (``same_type``) or another
    kind (``kind``, e.g. floating or not: dtype) is named, with both values; else the
    first leaf of ``got`` not in ``want``; else, with ``ordered``, leaves in another
    order. ``stacked``: each leaf of ``want`` has one more, trailing axis (several
    averages).

    Example:
      >>> import numpy as np
      >>> fit_problem({"w": np.zeros(3)}, {"w": np.zeros(2)},
      ...             got_name="the checkpoint", want_name="the target")
      'w has shape (3,) in the checkpoint but (2,) in the target (0 missing, 0 extra of 1 leaves in the target)'
    """  # noqa: E501
    problem = None
    for path, w in want.items():
        if path not in got:
            problem = f"{_possessive(want_name)} leaf {path} is not in {got_name}"
            break
        g = got[path]
        w_shape = shape_of(w)[:-1] if stacked else shape_of(w)
        if same_type and type(g) is not type(w):
            problem = (
                f"{path} is a {type(g).__name__} in {got_name} but a {type(w).__name__}"
                f" in {want_name}"
            )
        elif shape_of(g) != w_shape:
            problem = f"{path} has shape {shape_of(g)} in {got_name} but {w_shape} in {want_name}"
        elif kind is not None and kind(g) != kind(w):
            problem = (
                f"{path} has dtype {_dtype_name(g)} in {got_name} but {_dtype_name(w)} in"
                f" {want_name}: a floating leaf must stay floating and an integer leaf integer"
            )
        if problem is not None:
            break
    extra = [path for path in got if path not in want]
    if problem is None and extra:
        problem = f"{_possessive(got_name)} leaf {extra[0]} is not in {want_name}"
    if problem is None and ordered and list(got) != list(want):
        problem = f"the leaves come in another order in {got_name} than in {want_name}"
    if problem is None:
        return None
    missing = [path for path in want if path not in got]
    return (
        f"{problem} ({len(missing)} missing, {len(extra)} extra of {len(want)} leaves in"
        f" {want_name})"
    )


def check_params_match(params: PyTree, ema: PyTree, stacked: bool = False) -> PyTree:
    """Checks that ``params`` fits the EMA leaf by leaf; returns it in the EMA's treedef.

    Raises ``ValueError`` naming the first path that differs (missing, extra,
    other shape, averaged vs copied kind; :func:`fit_problem`), in Python, before
    any tracing error. Containers of another type but the same paths (``dict`` vs
    ``FrozenDict``) are accepted. ``stacked``: each EMA leaf has one more, trailing
    axis (several averages).
    """
    p_leaves, _ = jax.tree_util.tree_flatten_with_path(params)
    e_leaves, e_def = jax.tree_util.tree_flatten_with_path(ema)
    problem = fit_problem(
        {leaf_path(path): p for path, p in p_leaves},
        {leaf_path(path): e for path, e in e_leaves},
        got_name="params",
        want_name="the EMA",
        stacked=stacked,
        kind=is_averaged,
        ordered=True,
    )
    if problem is None and len(p_leaves) != len(e_leaves):  # paths that spell alike
        problem = f"params have {len(p_leaves)} leaves, the EMA {len(e_leaves)}"
    if problem is not None:
        raise ValueError(f"params do not match the EMA: {problem}")
    return jax.tree_util.tree_unflatten(e_def, [p for _, p in p_leaves])


def check_initial_value(path: str, p: Any, dtype: np.dtype | None, guarded: bool) -> None:
    """A concrete parameter must be finite (with the guard) and fit the EMA's dtype.

    Traced or non-addressable values (``init`` under ``jit``, multi-host arrays) are
    not checked: that would need their values on this host.
    """
    if isinstance(p, jax.core.Tracer) or not getattr(p, "is_fully_addressable", True):
        return
    values = np.asarray(p)
    if values.size == 0:
        return
    finite = np.isfinite(values)
    if guarded and not finite.all():
        raise ValueError(
            f"params{path} has {int((~finite).sum())} NaN/Inf entries at init: an EMA that"
            " starts non-finite stays so; initialise from finite parameters"
        )
    if dtype is not None and finite.any():  # a cast to ema_dtype
        peak = float(np.max(np.abs(values[finite])))
        largest = float(jnp.finfo(dtype).max)
        if peak > largest:
            raise ValueError(
                f"params{path} has entries up to {peak:.4g}, beyond the largest {dtype.name}"
                f" ({largest:.4g}): they would be Inf in the EMA; pass an ema_dtype that"
                " holds them (e.g. ema_dtype=jnp.float32)"
            )


def has_nonfinite(leaves: list[jax.Array]) -> jax.Array:
    """Whether any entry of any of the (inexact, non-empty) ``leaves`` is NaN or Inf.

    ``sum(x - x)`` is 0 when every entry is finite and NaN otherwise (``inf - inf``
    is NaN), with nothing to overflow. Two other forms are wrong or costly here:
    ``max(|x|)`` misses NaN on XLA:CPU, whose max of 4096 or more float32 entries
    ignores NaN; a variadic ``(max, min)`` reduce is exact but the SPMD partitioner
    does not split it, so a sharded leaf is all-gathered first. A sum is split into
    a local sum and one scalar all-reduce per mesh axis.
    """
    total = sum(jnp.sum(jnp.real(x - x), dtype=jnp.float32) for x in leaves)
    return ~jnp.isfinite(total)

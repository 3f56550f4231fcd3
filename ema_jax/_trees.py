"""Checks and reductions over parameter trees, shared by the transform: pure JAX."""

from __future__ import annotations

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


def check_params_match(params: PyTree, ema: PyTree, stacked: bool = False) -> PyTree:
    """Checks that ``params`` fits the EMA leaf by leaf; returns it in the EMA's treedef.

    Raises ``ValueError`` naming the first path that differs (missing, extra,
    other shape, averaged vs copied kind), in Python, before any tracing error.
    Containers of another type but the same paths (``dict`` vs ``FrozenDict``)
    are accepted. ``stacked``: each EMA leaf has one more, trailing axis (several
    averages).
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
        e_shape = jnp.shape(e)[:-1] if stacked else jnp.shape(e)
        if jnp.shape(p) != e_shape:
            raise ValueError(
                f"params{path} has shape {jnp.shape(p)}, but the EMA's leaf has shape {e_shape}"
            )
        if is_averaged(p) != is_averaged(e):
            raise ValueError(
                f"params{path} has dtype {dtype_of(p)}, but the EMA's leaf has dtype"
                f" {dtype_of(e)}: a floating leaf must stay floating and an integer leaf"
                " integer"
            )
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

"""A host-resident EMA: its leaves in host memory, streamed through the device per update.

``ema(schedule, memory_kind="pinned_host")`` keeps every EMA leaf in pinned host memory
with the parameters' sharding otherwise (the same mesh and spec, the memory kind
replaced). Inside the jitted update each leaf is moved to device memory, blended and
moved back, one leaf at a time in the program (``jax.device_put`` to a memory space).
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec
from jax.sharding import SingleDeviceSharding

HOST_KINDS = ("pinned_host",)  # the host memory kinds the update streams through the device
SUPPORTED = ("device", *HOST_KINDS)


def available_kinds() -> tuple[str, ...]:
    """The memory kinds of the default backend's first device."""
    return tuple(m.kind for m in jax.devices()[0].addressable_memories())


def check_memory_kind(kind: Any) -> str:
    """``kind`` if the backend has it and the EMA supports it; raises ``ValueError`` else.

    Example:
      >>> check_memory_kind("pinned_host")  # CPU has device, pinned_host, unpinned_host
      'pinned_host'
    """
    kinds = available_kinds()
    if not isinstance(kind, str) or kind not in kinds:
        raise ValueError(
            f"memory_kind must be one of the memory kinds of the {jax.default_backend()}"
            f" backend, {kinds}, or None (the parameters' memory), got {kind!r}"
        )
    if kind not in SUPPORTED:
        raise ValueError(
            f"memory_kind={kind!r} is not supported for an EMA: use one of {SUPPORTED}"
            " ('pinned_host' keeps it in host memory), or None"
        )
    return kind


def place(e: Any, p: Any, kind: str) -> Any:
    """EMA leaf ``e`` in memory ``kind``, with parameter ``p``'s sharding otherwise.

    ``e`` is the EMA's copy of ``p``: its own sharding is ``p``'s (with a trailing axis
    of averages where there are several), spelled as a jitted update spells its output.
    """
    if isinstance(p, jax.core.Tracer) or not hasattr(p, "sharding"):
        if isinstance(e, jax.core.Tracer):  # init under jit: a memory space, no sharding
            return jax.device_put(e, _space(kind))
        return jax.device_put(e, SingleDeviceSharding(jax.devices()[0], memory_kind=kind))
    sharding = e.sharding if isinstance(e.sharding, NamedSharding) else p.sharding
    return jax.device_put(e, sharding.with_memory_kind(kind))


def replicated(x: jax.Array, params: Any) -> jax.Array:
    """Scalar state ``x`` replicated over the mesh of ``params``' first sharded leaf.

    A jitted update returns its counters replicated over the mesh its inputs live on;
    a state whose counters sit on one device would make it compile a second time.
    Unchanged when no leaf has a ``NamedSharding`` on several devices (one device,
    or ``init`` under ``jit``).
    """
    for p in jax.tree.leaves(params):
        sharding = getattr(p, "sharding", None)
        if isinstance(p, jax.core.Tracer) or not isinstance(sharding, NamedSharding):
            continue
        if sharding.mesh.size > 1:
            return jax.device_put(x, NamedSharding(sharding.mesh, PartitionSpec()))
    return x


def check_placed(tree: Any, kind: str, name: str) -> None:
    """Raises ``ValueError`` at the first leaf of ``tree`` that is not in memory ``kind``.

    Called by the update, on concrete arrays and under ``jit`` alike (a tracer's type
    carries its memory space). A state built under ``jax.jit`` with ``out_shardings``
    that lack a memory kind lands in device memory, and an update traced with such
    ``out_shardings`` keeps it there: without this check the EMA would silently stay
    on the device.

    Example:
      >>> import jax.numpy as jnp
      >>> check_placed({"w": jnp.ones(2)}, "device", "state.ema")  # where it should be
    """
    want = _space(kind)
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        got = jax.typeof(x).memory_space
        if got != want and got != jax.memory.Space.Any:
            where = "host" if got == jax.memory.Space.Host else "device"
            raise ValueError(
                f"{name}{jax.tree_util.keystr(path)} is in {where} memory, but the EMA's"
                f" memory_kind is {kind!r}: give the EMA's leaves shardings with"
                f" memory_kind={kind!r} (sharding.with_memory_kind({kind!r})) in the"
                " out_shardings of the jax.jit that creates or updates the state and in a"
                " restore target's shardings, or let ema.init place them (no out_shardings)"
            )


def _space(kind: str) -> Any:
    return jax.memory.Space.Device if kind == "device" else jax.memory.Space.Host


def to_device(x: jax.Array) -> jax.Array:
    """``x`` moved to device memory, inside a jitted function (its sharding kept)."""
    return jax.device_put(x, jax.memory.Space.Device)


def to_host(x: jax.Array) -> jax.Array:
    """``x`` moved to pinned host memory, inside a jitted function (its sharding kept)."""
    return jax.device_put(x, jax.memory.Space.Host)

"""Stochastic rounding of the blend to a low-precision EMA: unbiased, reproducible, stateless.

Round-to-nearest loses every update smaller than half a unit in the last place: a
bfloat16 EMA at decay 0.9999 never moves. Rounding up with probability equal to the
fraction of the way to the next representable value keeps the stored EMA unbiased,
``E[round(x)] = x``, so that the small steps add up on average.

The noise is a counter-based hash of (update call, leaf index, element index): the
same on every run and after a resume, with no key in the state. Pure JAX, inside the
jitted update.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_M1, _M2 = 0x7FEB352D, 0x846CA68B  # lowbias32 (C. Wellons): a bijective 32-bit mix
_LEAF_SALT = 0x9E3779B9  # the golden ratio's bits, so that leaf 0's seed is not 0


def _mix(x: jax.Array) -> jax.Array:
    """lowbias32 on uint32: every output bit depends on every input bit."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(_M1)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(_M2)
    return x ^ (x >> 16)


def _mix_host(x: int) -> int:
    """:func:`_mix` in Python integers, for a seed known when tracing."""
    x &= 0xFFFFFFFF
    x ^= x >> 16
    x = (x * _M1) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * _M2) & 0xFFFFFFFF
    return x ^ (x >> 16)


def is_narrow(dtype: np.dtype) -> bool:
    """Real floating dtypes narrower than float32 (bfloat16, float16): they get the noise."""
    return bool(jnp.issubdtype(dtype, jnp.floating)) and np.dtype(dtype).itemsize < 4


def noise_bits(step: jax.Array, leaf: int, shape: tuple[int, ...]) -> jax.Array:
    """32 uniform random bits per element of a ``shape`` leaf, for call ``step``.

    ``mix(index ^ mix(step ^ mix(leaf + salt)))``: a bijection of the element's row-major
    index for each (step, leaf). Element indices wrap at ``2**32``.
    """
    index = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(shape))):
        iota = jax.lax.broadcasted_iota(jnp.uint32, shape, axis)
        index = index + iota * jnp.uint32(stride & 0xFFFFFFFF)
        stride *= shape[axis]
    seed = _mix(jnp.asarray(step).astype(jnp.uint32) ^ jnp.uint32(_mix_host(leaf + _LEAF_SALT)))
    return _mix(index ^ seed)


def round_stochastic(x: jax.Array, dtype: np.dtype, bits: jax.Array) -> jax.Array:
    """``x`` (float32) rounded to ``dtype``: up with probability ``frac``, else down.

    ``frac`` is how far ``x`` lies from the representable value below it towards the one
    above. NaN and Inf round to nearest (they stay what they are), and so do values
    beyond the dtype's range (they become Inf, as with nearest). ``bits``: uint32
    noise broadcastable to ``x``.

    Example:
      >>> import jax.numpy as jnp
      >>> x = jnp.full(100_000, 1.0 + 2.0**-10, jnp.float32)  # 1/8 of a bf16 ulp above 1
      >>> bits = noise_bits(jnp.int32(0), 0, x.shape)
      >>> y = round_stochastic(x, jnp.bfloat16, bits).astype(jnp.float32)
      >>> sorted(set(y.tolist())), round(float(y.mean() - 1.0) * 2**10, 1)
      ([1.0, 1.0078125], 1.0)
    """
    x = x.astype(jnp.float32)
    special = ~jnp.isfinite(x)
    nearest = x.astype(dtype)
    if np.dtype(dtype) == jnp.bfloat16:  # float32's exponent: add noise below bit 16, truncate
        raw = jax.lax.bitcast_convert_type(x, jnp.uint32)
        up = (raw + (bits >> 16)) >> 16
        rounded = jax.lax.bitcast_convert_type(up.astype(jnp.uint16), jnp.bfloat16)
        return jnp.where(special, nearest, rounded)
    # Any other narrow dtype: find the neighbours below and above x and pick one.
    near = nearest.astype(jnp.float32)
    other = jnp.nextafter(nearest, jnp.where(near < x, jnp.inf, -jnp.inf).astype(dtype))
    lo = jnp.where(near < x, nearest, other)
    hi = jnp.where(near < x, other, nearest)
    lo_f, hi_f = lo.astype(jnp.float32), hi.astype(jnp.float32)
    frac = (x - lo_f) / (hi_f - lo_f)  # exact differences of nearby floats; 0 when hi is Inf
    uniform = (bits >> 8).astype(jnp.float32) * np.float32(2.0**-24)
    rounded = jnp.where(uniform < frac, hi, lo)
    exact = (near == x) | jnp.isinf(near)  # representable, or beyond the dtype's range
    return jnp.where(special | exact, nearest, rounded)

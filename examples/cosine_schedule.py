"""A schedule family written outside ema_jax: an EMA whose decay rises along a cosine.

The whole family is this module: a frozen dataclass of its hyperparameters, the hooks
of the schedule protocol (``docs/schedules.md``) and one line of registration. After
``import cosine_schedule``, ``ema_jax.ema(CosineDecay(...))`` runs it under jit,
``ema_jax.explain`` reports on it, and ``python -m ema_jax explain`` (in a process that
imported it) offers it as ``--schedule cosine_decay``.

Run it: ``python examples/cosine_schedule.py`` prints the report of a 10k-step run and
the EMA of a toy parameter trajectory.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from ema_jax import schedules
from ema_jax.schedules import Schedule
from ema_jax.schedules import real
from ema_jax.schedules import register


@register
@dataclasses.dataclass(frozen=True, kw_only=True)
class CosineDecay(Schedule):
    r"""An EMA whose decay rises from ``decay_start`` to ``decay_end`` along a half cosine.

    At call ``i`` (0-based) the step size is :math:`\alpha_i = 1 - d(t)` with
    :math:`t = \min(i, \text{total\_steps}) / \text{total\_steps}` and

    .. math::
      d(t) = \text{decay\_end} - (\text{decay\_end} - \text{decay\_start})
             \frac{1 + \cos(\pi t)}{2},

    so the EMA follows the parameters closely early and averages over more and more
    steps later; call 0 copies the parameters.

    Args:
      decay_start: the decay at call 0, in [0, 1).
      decay_end: the decay from ``total_steps`` on, in [decay_start, 1).
      total_steps: optimizer steps over which the decay rises (>= 1).
      update_period: update every this many calls (>= 1).
    """

    name = "cosine_decay"
    decay_start: float = 0.9
    decay_end: float = 0.999
    total_steps: int
    update_period: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()  # the base class checks update_period
        if not 0.0 <= self.decay_start <= self.decay_end < 1.0:
            raise ValueError(
                "decay_start and decay_end must satisfy 0 <= decay_start <= decay_end < 1,"
                f" got decay_start={self.decay_start!r} and decay_end={self.decay_end!r}"
            )
        if isinstance(self.total_steps, bool) or not isinstance(self.total_steps, int):
            raise ValueError(f"total_steps must be an integer >= 1, got {self.total_steps!r}")
        if self.total_steps < 1:
            raise ValueError(f"total_steps must be an integer >= 1, got {self.total_steps!r}")

    def step_size(self, i: Any, xp: Any) -> Any:
        # One expression for both worlds: xp is jax.numpy under jit (i traced int32,
        # float32 math) and numpy on the host (float64, for explain and tests).
        t = xp.minimum(real(i, xp), float(self.total_steps)) / self.total_steps
        rise = (self.decay_end - self.decay_start) * (1.0 + xp.cos(math.pi * t)) / 2.0
        return 1.0 - (self.decay_end - rise)

    def copies_at(self, i: Any, xp: Any) -> Any:
        return i == 0  # a traced bool under jit, a Python/NumPy bool on the host

    def steps_in_run(self) -> int | None:
        return self.total_steps

    @classmethod
    def example(cls) -> CosineDecay:
        return cls(total_steps=10_000)


cosine_decay = CosineDecay


def main() -> None:
    import jax
    import jax.numpy as jnp

    import ema_jax

    schedule = cosine_decay(decay_start=0.9, decay_end=0.999, total_steps=10_000)
    print(ema_jax.explain(schedule))
    ema = ema_jax.ema(schedule)
    update = jax.jit(ema.update, donate_argnums=1)
    state = ema.init({"w": jnp.zeros(())})
    for i in range(100):
        state = update({"w": jnp.asarray(float(i))}, state)
    print(f"\nEMA of w = 0, 1, ..., 99 after 100 calls: {float(state.ema['w']):.4f}")
    assert schedules.REGISTRY["cosine_decay"] is CosineDecay


if __name__ == "__main__":
    main()

"""`normalized_ema`: pycls's EMA in one call, ``ema(schedules.pycls(...))`` underneath."""

from __future__ import annotations

from typing import Any

from ema_jax import _validate
from ema_jax._transform import Ema
from ema_jax._transform import Nonfinite
from ema_jax._transform import ema
from ema_jax.schedules import pycls
from ema_jax.schedules._pycls import Rule

NormalizedEma = Ema
"""The type :func:`normalized_ema` returns (every transform is an :class:`Ema`)."""


def normalized_ema(
    *,
    ema_alpha: float,
    batch_size: float,
    max_epoch: float,
    update_period: int = 32,
    warmup_epochs: int = 0,
    steps_per_epoch: int | None = None,
    rule: Rule = "linear",
    ema_dtype: Any = None,
    skip_nonfinite: bool = True,
    count_nonfinite: bool = True,
) -> Ema:
    r"""pycls's EMA in one call: the compatibility form of ``ema(schedules.pycls(...))``.

    ``ema(schedules.pycls(...), ema_dtype=..., nonfinite=...)`` under the signature it
    has always had, kept (with its defaults) for code written against it; new code
    writes ``ema_jax.ema(schedules.pycls(...))``, whose default guard
    (``nonfinite="skip"``) does not count and is faster. The hyperparameters are
    documented on :class:`ema_jax.schedules.Pycls`. Every ``update_period`` optimizer steps (counted
    within each epoch, so the first step of every epoch updates), the average moves
    towards the parameters:

    .. math::
      \alpha = \min\left(1, \text{ema\_alpha}\cdot\frac{\text{batch\_size}}
               {\text{max\_epoch}}\cdot\text{update\_period}\right),\qquad
      \text{ema} \leftarrow \text{ema} + \alpha\,(\text{params} - \text{ema}),

    and during the first ``warmup_epochs`` epochs it copies them. The half-life is
    then about :math:`\ln 2\cdot\text{max\_epoch}/\text{ema\_alpha}` samples, a fixed
    fraction of training whatever the batch size, update period and schedule length.

    The guard's two flags map to :func:`ema_jax.ema`'s ``nonfinite``:
    ``skip_nonfinite=False`` is ``"propagate"``; with it, ``count_nonfinite=True``
    (this function's default, kept from its first version) is ``"skip_and_count"``
    and ``False`` is ``"skip"`` (:func:`ema_jax.ema`'s default: no communication,
    no second pass).

    Args:
      ema_alpha, batch_size, max_epoch, update_period, warmup_epochs,
        steps_per_epoch, rule: :class:`ema_jax.schedules.Pycls`'s hyperparameters.
      ema_dtype: dtype of the EMA's floating leaves (e.g. ``jnp.float32`` for bf16
        parameters); None keeps each parameter's dtype.
      skip_nonfinite: keep the previous EMA value where an update's result is NaN/Inf.
      count_nonfinite: with ``skip_nonfinite``, count such updates in
        ``EmaState.nonfinite_updates``; on sharded parameters this costs a scalar
        all-reduce per mesh axis at each EMA update.

    Returns:
      An :class:`ema_jax.Ema` with ``alpha``, ``init(params)`` and
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
    schedule = pycls(
        ema_alpha=ema_alpha,
        batch_size=batch_size,
        max_epoch=max_epoch,
        update_period=update_period,
        warmup_epochs=warmup_epochs,
        steps_per_epoch=steps_per_epoch,
        rule=rule,
    )
    _validate.check_bool("skip_nonfinite", skip_nonfinite)
    _validate.check_bool("count_nonfinite", count_nonfinite)
    nonfinite: Nonfinite = "propagate"
    if skip_nonfinite:
        nonfinite = "skip_and_count" if count_nonfinite else "skip"
    return ema(schedule, ema_dtype=ema_dtype, nonfinite=nonfinite)

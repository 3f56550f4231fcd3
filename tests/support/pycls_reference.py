"""pycls's EMA, literally, in plain NumPy: the independent reference for the tests.

A transcription of ``update_model_ema`` from pycls (``pycls/core/net.py``) with the
config values passed in, and of the loop in ``train_epoch`` that calls it after
every optimizer step. Integer leaves are copied, where pycls pushes them through
the float blend and truncates (the one documented difference).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def update_model_ema(
    model: dict[str, np.ndarray],
    model_ema: dict[str, np.ndarray],
    cur_epoch: int,
    cur_iter: int,
    *,
    ema_alpha: float,
    batch_size: float,
    max_epoch: float,
    update_period: int,
    warmup_epochs: int,
    alpha: float | None = None,
) -> None:
    """Updates ``model_ema`` in place, as pycls does after one optimizer step.

    ``alpha``, when given, replaces pycls's linear step size (to test other rules
    with the same loop).
    """
    if update_period == 0 or cur_iter % update_period != 0:
        return
    if alpha is None:
        adjust = batch_size / max_epoch * update_period
        alpha = min(1.0, ema_alpha * adjust)
    alpha = 1.0 if cur_epoch < warmup_epochs else alpha
    for name, param in model_ema.items():
        if np.issubdtype(param.dtype, np.floating):
            param[...] = param * (1.0 - alpha) + model[name] * alpha
        else:
            param[...] = model[name]


def run(
    trajectory: Sequence[dict[str, np.ndarray]],
    *,
    steps_per_epoch: int,
    **hyper: float,
) -> dict[str, np.ndarray]:
    """The EMA after pycls's training loop has seen ``trajectory`` (one dict per step).

    The EMA starts as a copy of the first entry (the initial model); entry ``i + 1``
    is the model after optimizer step ``i``, at ``cur_epoch = i // steps_per_epoch``
    and ``cur_iter = i % steps_per_epoch``. Computed in float64.
    """
    ema = {
        k: np.array(v, dtype=np.float64 if np.issubdtype(v.dtype, np.floating) else v.dtype)
        for k, v in trajectory[0].items()
    }
    for i, model in enumerate(trajectory[1:]):
        model64 = {
            k: np.asarray(v, np.float64) if np.issubdtype(v.dtype, np.floating) else v
            for k, v in model.items()
        }
        update_model_ema(model64, ema, i // steps_per_epoch, i % steps_per_epoch, **hyper)
    return ema

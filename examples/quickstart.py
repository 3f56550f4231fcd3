"""A minute with `ema(schedules.pycls(...))`: pycls's EMA of a noisy parameter, under jit.

Run: python examples/quickstart.py
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import ema_jax
from ema_jax import schedules


def main() -> None:
    # pycls's CIFAR recipe: EMA_ALPHA 2.5e-4, batch 128, 100 epochs, update every 32 steps.
    steps_per_epoch = 390
    ema = ema_jax.ema(
        schedules.pycls(
            ema_alpha=2.5e-4,
            batch_size=128,
            max_epoch=100,
            update_period=32,
            warmup_epochs=1,
            steps_per_epoch=steps_per_epoch,
        )
    )
    print(f"per-update alpha: {ema.alpha:.5f}")
    print(ema.explain(dataset_size=50_000))  # what these hyperparameters mean, at the start

    # "Training": parameters that wander noisily around 1.0.
    params = {"w": jnp.zeros(4)}
    state = ema.init(params)

    @jax.jit
    def step(params, state, key):
        params = {"w": 1.0 + 0.5 * jax.random.normal(key, (4,))}
        return params, ema.update(params, state)

    key = jax.random.key(0)
    for _ in range(5 * steps_per_epoch):
        key, sub = jax.random.split(key)
        params, state = step(params, state, sub)
    print(f"after {int(state.step)} steps")
    print("raw params:", params["w"])
    print("EMA       :", state.ema["w"])


if __name__ == "__main__":
    main()

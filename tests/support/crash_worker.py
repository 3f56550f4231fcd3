"""A deterministic training loop that checkpoints every step: the crash-safety test kills it.

Run as ``python tests/support/crash_worker.py WORKDIR MAX_STEPS``. It resumes from the
latest complete checkpoint in WORKDIR, then trains, saving asynchronously after
every step and printing ``saving N`` right after each ``manager.save`` returns
(the write is then still in flight), until MAX_STEPS. The state after step ``s``
depends on ``s`` alone, so the test can recompute it in-process.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp

import ema_jax

# Large enough (3 x 4 MiB per checkpoint) that a save takes a while to write.
WIDTH = 1024
EMA = ema_jax.normalized_ema(
    ema_alpha=0.05,
    batch_size=8,
    max_epoch=4,
    update_period=2,
    warmup_epochs=1,
    steps_per_epoch=3,
)


def apply_fn(variables: dict, x: jax.Array) -> jax.Array:
    return x @ variables["params"]["w"] + variables["params"]["b"]


def initial_state() -> ema_jax.EmaTrainState:
    key = jax.random.key(0)
    params = {
        "w": jax.random.normal(key, (WIDTH, WIDTH)) / WIDTH**0.5,
        "b": jnp.zeros(WIDTH),
    }
    return ema_jax.EmaTrainState.create(
        apply_fn=apply_fn, params=params, tx=optax.sgd(0.5, momentum=0.9), ema=EMA
    )


@jax.jit
def train_step(state: ema_jax.EmaTrainState) -> ema_jax.EmaTrainState:
    """One SGD step on a batch that is a function of the step number only."""
    key = jax.random.fold_in(jax.random.key(1), state.step)
    x = jax.random.normal(key, (8, WIDTH))
    y = jnp.roll(x, 1, axis=1)

    def loss(params: dict) -> jax.Array:
        return jnp.mean((state.apply_fn({"params": params}, x) - y) ** 2)

    return state.apply_gradients(grads=jax.grad(loss)(state.params))


def manager(workdir: Path) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        workdir.absolute(), options=ocp.CheckpointManagerOptions(max_to_keep=3)
    )


def restore_latest(mgr: ocp.CheckpointManager) -> ema_jax.EmaTrainState | None:
    """The newest checkpoint orbax lists as complete, or None."""
    step = mgr.latest_step()
    if step is None:
        return None
    return mgr.restore(step, args=ocp.args.StandardRestore(initial_state()))


def main(workdir: Path, max_steps: int) -> None:
    mgr = manager(workdir)
    state = restore_latest(mgr) or initial_state()
    print(f"resumed {int(state.step)}", flush=True)
    while int(state.step) < max_steps:
        state = train_step(state)
        mgr.save(int(state.step), args=ocp.args.StandardSave(state))
        print(f"saving {int(state.step)}", flush=True)
    mgr.wait_until_finished()
    mgr.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))

"""Train a small CNN on scikit-learn's handwritten digits in Flax NNX, with pycls's EMA.

The NNX twin of ``train_digits.py``: the same data, recipe, table and plot, with
``ema_jax.nnx.Ema`` in the place of ``nnx.EMA``. Each epoch evaluates the raw and the
EMA weights on a held-out split and checkpoints model, optimizer and EMA with
``ema_jax.nnx.save_checkpoint`` (orbax, with a checksum of every array and the EMA's
settings) into ``--workdir``; run it again and it resumes from the newest intact
checkpoint (or, when the run is complete, just prints the results). Like pycls
(``BN.USE_PRECISE_STATS``), after every epoch it recomputes the BatchNorm statistics
of the raw and of the EMA weights on training batches (``--no-precise-bn`` turns that
off). At the end it prints a table of test accuracy: raw weights, EMA weights with
their averaged BatchNorm statistics, EMA weights with precise ones; and writes
``curves.png`` into the workdir.

Run: python examples/train_digits_nnx.py [--workdir workdir/digits_nnx] [--epochs 20]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from tqdm import tqdm

from ema_jax import nnx as ema_nnx

EXAMPLES = pathlib.Path(__file__).resolve().parent
if str(EXAMPLES) not in sys.path:  # imported by path (tests): train_digits.py is beside it
    sys.path.insert(0, str(EXAMPLES))

# The data, the command line, the table and the plot are the linen example's.
from train_digits import NUM_SAMPLES_PRECISE  # noqa: E402
from train_digits import RUN_SETTINGS  # noqa: E402
from train_digits import describe  # noqa: E402
from train_digits import load_data  # noqa: E402
from train_digits import make_transform  # noqa: E402
from train_digits import parse_args as linen_parse_args  # noqa: E402
from train_digits import plot  # noqa: E402
from train_digits import print_table  # noqa: E402


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    return linen_parse_args(argv, description=__doc__.split("\n")[0], workdir="digits_nnx")


class Cnn(nnx.Module):
    """Two conv + BatchNorm blocks, global average pooling, a linear classifier."""

    def __init__(self, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, 32, (3, 3), use_bias=False, rngs=rngs)
        self.bn1 = nnx.BatchNorm(32, momentum=0.9, rngs=rngs)
        self.conv2 = nnx.Conv(32, 64, (3, 3), strides=2, use_bias=False, rngs=rngs)
        self.bn2 = nnx.BatchNorm(64, momentum=0.9, rngs=rngs)
        self.head = nnx.Linear(64, 10, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.relu(self.bn1(self.conv1(x)))
        x = nnx.relu(self.bn2(self.conv2(x)))
        return self.head(x.mean(axis=(1, 2)))


def create(args: argparse.Namespace, steps_per_epoch: int) -> tuple[Cnn, Any, ema_nnx.Ema]:
    """Model, optimizer and EMA at step 0."""
    model = Cnn(nnx.Rngs(args.seed))
    # One epoch of linear warmup from 10%, as pycls's WARMUP_EPOCHS/WARMUP_FACTOR; then
    # constant, so that the raw weights stay noisy to the end.
    lr = optax.warmup_constant_schedule(0.1 * args.lr, args.lr, warmup_steps=steps_per_epoch)
    optimizer = nnx.Optimizer(model, optax.sgd(lr, momentum=0.9), wrt=nnx.Param)
    transform = make_transform(args, steps_per_epoch)  # --ema: pycls's EMA or BEMA
    # The default `only` averages the weights (nnx.Param) and the BatchNorm statistics
    # (nnx.BatchStat), as pycls averages the whole state dict.
    return model, optimizer, ema_nnx.Ema(model, transform)


@nnx.jit(donate_argnums=(0, 1, 2))  # one compilation; the EMA is written in place
def train_step(model: Cnn, optimizer: Any, ema: ema_nnx.Ema, x: jax.Array, y: jax.Array):
    def loss_fn(model: Cnn) -> jax.Array:
        logits = model(x)  # BatchNorm in training mode updates its statistics
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    ema.update(model)  # after the optimizer step
    return loss


@nnx.jit
def evaluate(raw: Cnn, averaged: Cnn, x: jax.Array, y: jax.Array) -> jax.Array:
    """Test accuracy of the raw weights and of the EMA weights (with their BN stats)."""
    return jnp.stack([jnp.mean(jnp.argmax(m(x), -1) == y) for m in (raw, averaged)])


def best_row(history: list[dict[str, float]], metric: str) -> dict[str, float]:
    """The row with the best ``metric``; on a tie, the later one."""
    return max(reversed(history), key=lambda row: row[metric])


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Trains (or resumes); returns the history, the best rows and what this call trained."""
    args = parse_args(argv)
    settings = {name: getattr(args, name) for name in RUN_SETTINGS}
    x_train, y_train, x_test, y_test = load_data(args.quick)
    steps_per_epoch = len(x_train) // args.batch_size  # the last partial batch is dropped
    if steps_per_epoch == 0:
        sys.exit(f"--batch-size {args.batch_size} exceeds the {len(x_train)} training images")
    model, optimizer, ema = create(args, steps_per_epoch)
    transform = ema.transform
    print(describe(transform, steps_per_epoch, (len(x_train), len(x_test))))
    print(transform.explain())  # what these EMA settings mean: half-life, warnings
    precise_bn = not args.no_precise_bn
    if precise_bn:
        batches = min(NUM_SAMPLES_PRECISE // args.batch_size, steps_per_epoch)
        print(f"Precise BN statistics after every epoch, from {batches} training batches")

    workdir = os.path.abspath(args.workdir)
    history: list[dict[str, float]] = []
    options = ocp.CheckpointManagerOptions(max_to_keep=2, create=True)
    with ocp.CheckpointManager(
        os.path.join(workdir, "checkpoints"),
        item_handlers=ocp.StandardCheckpointHandler(),
        options=options,
    ) as manager:
        if manager.latest_step() is not None:
            # Restore in place into abstract objects (nnx.eval_shape): model, optimizer
            # and EMA, step included, from the newest step whose arrays match their
            # checksums and whose EMA has these settings; a damaged newer step is
            # skipped with a warning naming it.
            model, optimizer, ema = nnx.eval_shape(lambda: create(args, steps_per_epoch))
            try:
                restored = ema_nnx.restore_checkpoint(manager, (model, optimizer, ema))
            except ema_nnx.EmaSettingsMismatchError as err:
                sys.exit(
                    f"{workdir} holds a run with other settings ({err}); pass another --workdir"
                )
            saved = manager.item_metadata(restored).custom_metadata
            if saved["settings"] != settings:
                sys.exit(
                    f"{workdir} holds a run with other settings ({saved['settings']});"
                    " pass another --workdir"
                )
            history = saved["history"]
            for damaged in [step for step in manager.all_steps() if step > restored]:
                manager.delete(damaged)  # so that this run writes that step again
                print(f"Deleted checkpoint step {damaged}: it failed verification")
        # Evaluation views: they share the variables (and follow every update), with
        # BatchNorm on its running statistics; the EMA's view holds the EMA's.
        raw_eval = nnx.view(model, use_running_average=True)
        ema_eval = nnx.view(ema.apply_to(model), use_running_average=True)
        start = int(optimizer.step[...]) // steps_per_epoch
        if start >= args.epochs:
            print(f"{workdir} holds the whole run ({args.epochs} epochs): nothing to train.")
        elif start > 0:
            print(f"Resuming from epoch {start} in {workdir}")
        x_eval, y_eval = jnp.asarray(x_test), jnp.asarray(y_test)
        bar = tqdm(
            total=(args.epochs - start) * steps_per_epoch,
            disable=args.no_progress or start >= args.epochs,
            unit="step",
        )
        for epoch in range(start, args.epochs):
            # The data order depends only on (seed, epoch): a resumed run sees the same.
            order = np.random.default_rng([args.seed, epoch]).permutation(len(x_train))
            for i in range(steps_per_epoch):
                idx = order[i * args.batch_size : (i + 1) * args.batch_size]
                train_step(model, optimizer, ema, x_train[idx], y_train[idx])
                bar.update()
            accuracies = evaluate(raw_eval, ema_eval, x_eval, y_eval)
            accuracy, ema_accuracy = (float(a) for a in accuracies)
            row = {"epoch": epoch + 1, "accuracy": accuracy, "ema_accuracy": ema_accuracy}
            if precise_bn:  # pycls's end of epoch, on this epoch's training batches
                ema_nnx.recompute_batch_stats(
                    model,
                    ema,
                    (
                        x_train[order[i * args.batch_size : (i + 1) * args.batch_size]]
                        for i in range(steps_per_epoch)
                    ),
                    num_samples=NUM_SAMPLES_PRECISE,
                )
                accuracies = evaluate(raw_eval, ema_eval, x_eval, y_eval)  # the views follow
                accuracy, ema_precise = (float(a) for a in accuracies)
                row |= {"accuracy": accuracy, "ema_precise_accuracy": ema_precise}
            history.append(row)
            bar.set_postfix(epoch=epoch + 1, raw=f"{accuracy:.3f}", ema=f"{ema_accuracy:.3f}")
            step = int(optimizer.step[...])
            # A copy: orbax writes the metadata in the background, after later epochs.
            meta = {"settings": settings, "history": [dict(r) for r in history]}
            # + a CRC-32 of every array and the EMA's settings, checked on restore
            ema_nnx.save_checkpoint(manager, step, (model, optimizer, ema), custom_metadata=meta)
        bar.close()

    print_table(history, precise_bn)
    ema_metric = "ema_precise_accuracy" if precise_bn else "ema_accuracy"
    best_rows = {"raw": best_row(history, "accuracy"), "ema": best_row(history, ema_metric)}
    raw, ema_row = best_rows["raw"], best_rows["ema"]
    print(f"best raw: {raw['accuracy']:.4f} (epoch {raw['epoch']})")
    which = " (precise BN statistics)" if precise_bn else ""
    print(f"best EMA{which}: {ema_row[ema_metric]:.4f} (epoch {ema_row['epoch']})")
    nonfinite = int(ema.ema_state.nonfinite_updates)
    print(f"EMA updates skipped for NaN/Inf weights: {nonfinite}")
    if not args.no_plot:
        plot(history, os.path.join(workdir, "curves.png"))
        print(f"wrote {os.path.join(workdir, 'curves.png')}")
    return {
        # One row per epoch: epoch, accuracy, ema_accuracy (averaged BN statistics)
        # and, with precise BN, ema_precise_accuracy.
        "history": history,
        "best": best_rows,  # {"raw": row, "ema": row}: the best epochs by each metric
        "trained_epochs": args.epochs - min(start, args.epochs),  # by this call
        "nonfinite_updates": nonfinite,
        "workdir": workdir,
    }


if __name__ == "__main__":
    main()

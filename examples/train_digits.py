"""Train a small CNN on scikit-learn's handwritten digits, with pycls's EMA of its weights.

Each epoch evaluates the raw and the EMA weights on a held-out split and checkpoints
everything with orbax into ``--workdir``; run it again and it resumes from the newest
checkpoint that passes verification (or, when the run is complete, just prints the
results). Like pycls (``BN.USE_PRECISE_STATS``), after every epoch it recomputes the
BatchNorm statistics of the raw and of the EMA weights on training batches
(``--no-precise-bn`` turns that off). At the end it prints a table of test accuracy:
raw weights, EMA weights with their averaged BatchNorm statistics, EMA weights with
precise ones; and writes ``curves.png`` into the workdir.

Run: python examples/train_digits.py [--workdir workdir/digits] [--epochs 20]
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm import tqdm

import ema_jax
from ema_jax import schedules

NUM_SAMPLES_PRECISE = 8192  # pycls's BN.NUM_SAMPLES_PRECISE, precise_batch_stats' default

# The settings a checkpoint belongs to: resuming with other values would mix two runs.
RUN_SETTINGS = (
    "epochs",
    "batch_size",
    "lr",
    "ema_alpha",
    "update_period",
    "seed",
    "quick",
    "no_precise_bn",
    "ema",
    "ema_dtype",
    "rounding",
)


def parse_args(
    argv: Sequence[str] | None, *, description: str | None = None, workdir: str = "digits"
) -> argparse.Namespace:
    """The command line (the NNX twin passes its own description and workdir)."""
    parser = argparse.ArgumentParser(description=description or __doc__.split("\n")[0])
    parser.add_argument("--workdir", default=os.path.join("workdir", workdir))
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    # High on purpose: the raw weights keep jumping, and the EMA averages the jumps out.
    parser.add_argument("--lr", type=float, default=2.0, help="SGD learning rate after warmup")
    # pycls's CIFAR recipe (EMA_ALPHA 2.5e-4, 50k images) gives the EMA a half-life of
    # 5.5% of training; with 1344 images per epoch, 1e-2 keeps about that (5.2%).
    parser.add_argument("--ema-alpha", type=float, default=1e-2, help="pycls's EMA_ALPHA")
    # pycls's default 32 suits epochs of hundreds of steps; an epoch here has 42.
    parser.add_argument("--update-period", type=int, default=4, help="pycls's EMA_UPDATE_PERIOD")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--ema",
        choices=("pycls", "bema"),
        default="pycls",
        help="pycls's EMA (default) or BEMA, the bias-corrected EMA (TRL's BEMACallback)",
    )
    parser.add_argument(
        "--ema-dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="the EMA's dtype (the model trains in float32)",
    )
    parser.add_argument(
        "--rounding",
        choices=("nearest", "stochastic"),
        default="nearest",
        help="how blends round into a bfloat16 EMA (stochastic: unbiased)",
    )
    parser.add_argument(
        "--no-precise-bn",
        action="store_true",
        help="keep the running/averaged BatchNorm statistics (pycls recomputes them every epoch)",
    )
    parser.add_argument("--quick", action="store_true", help="2 short epochs on 256 images (tests)")
    parser.add_argument("--no-plot", action="store_true", help="do not write curves.png")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs = 2
    if args.rounding == "stochastic" and args.ema_dtype == "float32":
        parser.error("--rounding stochastic needs --ema-dtype bfloat16 (float32 rounds exactly)")
    if args.epochs < 1 or args.batch_size < 1:
        parser.error(
            f"--epochs and --batch-size must be >= 1, got {args.epochs}, {args.batch_size}"
        )
    return args


def load_data(quick: bool) -> tuple[np.ndarray, ...]:
    """The 1797 8x8 digits shipped with scikit-learn, split 75/25 (stratified, fixed)."""
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[..., None]  # NHWC, in [0, 1]
    labels = digits.target.astype(np.int32)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=0.25, random_state=0, stratify=labels
    )
    if quick:
        x_train, y_train = x_train[:256], y_train[:256]
    return x_train, y_train, x_test, y_test


class Cnn(nn.Module):
    """Two conv + BatchNorm blocks, global average pooling, a linear classifier."""

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        for features, strides in ((32, 1), (64, 2)):
            x = nn.Conv(features, (3, 3), strides=strides, use_bias=False)(x)
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
            x = nn.relu(x)
        return nn.Dense(10)(x.mean(axis=(1, 2)))


def make_transform(args: argparse.Namespace, steps_per_epoch: int) -> Any:
    """The EMA transform ``--ema`` names (both examples use it)."""
    # float32: the parameters' own dtype, so the EMA keeps it (ema_dtype=None).
    ema_dtype = None if args.ema_dtype == "float32" else args.ema_dtype
    dtype = {"ema_dtype": ema_dtype, "rounding": args.rounding}
    if args.ema == "bema":
        # TRL's BEMA defaults, updating as often as the pycls EMA does here; its EMA and
        # theta0 snapshot the weights after the warmup epoch, as pycls's EMA copies them.
        return ema_jax.bema(update_period=args.update_period, update_after=steps_per_epoch, **dtype)
    return ema_jax.ema(
        schedules.pycls(
            ema_alpha=args.ema_alpha,  # pycls's EMA_ALPHA
            batch_size=args.batch_size,  # global batch size
            max_epoch=args.epochs,  # schedule length
            update_period=args.update_period,  # update every k optimizer steps
            warmup_epochs=1,  # copy the weights during the warmup epoch
            steps_per_epoch=steps_per_epoch,
        ),
        nonfinite="skip_and_count",  # skip NaN/Inf weights, and count them (reported)
        **dtype,
    )


def describe(ema: Any, steps_per_epoch: int, images: tuple[int, int]) -> str:
    """The line printed at the start: the data, and how the EMA updates."""
    alpha = "varies" if ema.alpha is None else f"{ema.alpha:.4f}"
    return (
        f"{images[0]} training / {images[1]} test images, {steps_per_epoch} steps per"
        f" epoch; EMA alpha per update {alpha}, every {ema.update_period} steps"
    )


def create_state(args: argparse.Namespace, steps_per_epoch: int) -> ema_jax.EmaTrainState:
    model = Cnn()
    variables = model.init(jax.random.key(args.seed), jnp.ones((1, 8, 8, 1)), train=False)
    # One epoch of linear warmup from 10%, as pycls's WARMUP_EPOCHS/WARMUP_FACTOR; then
    # constant, so that the raw weights stay noisy to the end.
    lr = optax.warmup_constant_schedule(0.1 * args.lr, args.lr, warmup_steps=steps_per_epoch)
    ema = make_transform(args, steps_per_epoch)
    return ema_jax.EmaTrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        tx=optax.sgd(lr, momentum=0.9),
        ema=ema,
    )


@jax.jit
def evaluate(state: ema_jax.EmaTrainState, x: jax.Array, y: jax.Array) -> jax.Array:
    """Test accuracy of the raw weights and of the EMA weights (with their BN stats)."""
    raw = {"params": state.params, "batch_stats": state.batch_stats}
    accuracy = []
    for variables in (raw, state.ema_variables()):
        logits = state.apply_fn(variables, x, train=False)
        accuracy.append(jnp.mean(jnp.argmax(logits, -1) == y))
    return jnp.stack(accuracy)


def _train_step(state: ema_jax.EmaTrainState, x: jax.Array, y: jax.Array) -> Any:
    def loss_fn(params):
        variables = {"params": params, "batch_stats": state.batch_stats}
        logits, updates = state.apply_fn(variables, x, train=True, mutable=["batch_stats"])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, updates["batch_stats"]

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return state.apply_gradients(grads=grads, batch_stats=batch_stats), loss


train_step = jax.jit(_train_step, donate_argnums=0)


def print_table(history: list[dict[str, float]], precise_bn: bool) -> None:
    if precise_bn:
        print(
            "Test accuracy. raw: raw weights, precise BN statistics; EMA: EMA weights, their"
            " averaged BN statistics; EMA pBN: EMA weights, precise BN statistics"
        )
        print(f"{'epoch':>5}  {'raw acc':>7}  {'EMA acc':>7}  {'EMA pBN acc':>11}")
        for row in history:
            print(
                f"{row['epoch']:>5d}  {row['accuracy']:>7.4f}  {row['ema_accuracy']:>7.4f}"
                f"  {row['ema_precise_accuracy']:>11.4f}"
            )
        return
    print(
        "Test accuracy. raw: raw weights, running BN statistics; EMA: EMA weights, their"
        " averaged BN statistics"
    )
    print(f"{'epoch':>5}  {'raw acc':>7}  {'EMA acc':>7}")
    for row in history:
        print(f"{row['epoch']:>5d}  {row['accuracy']:>7.4f}  {row['ema_accuracy']:>7.4f}")


def plot(history: list[dict[str, float]], path: str, title: str = "Digits") -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [row["epoch"] for row in history]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, [100 * row["accuracy"] for row in history], ".-", label="raw weights")
    ema_label = "EMA weights, averaged BN statistics"
    ax.plot(epochs, [100 * row["ema_accuracy"] for row in history], ".-", label=ema_label)
    if "ema_precise_accuracy" in history[0]:
        precise = [100 * row["ema_precise_accuracy"] for row in history]
        ax.plot(epochs, precise, ".-", label="EMA weights, precise BN statistics")
    ax.set(xlabel="epoch", ylabel="test accuracy (%)", title=f"{title}: raw vs EMA weights")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Trains (or resumes); returns the history, the best rows and what this call trained."""
    args = parse_args(argv)
    settings = {name: getattr(args, name) for name in RUN_SETTINGS}
    x_train, y_train, x_test, y_test = load_data(args.quick)
    steps_per_epoch = len(x_train) // args.batch_size  # the last partial batch is dropped
    if steps_per_epoch == 0:
        sys.exit(f"--batch-size {args.batch_size} exceeds the {len(x_train)} training images")
    state = create_state(args, steps_per_epoch)
    ema = state.ema
    print(describe(ema, steps_per_epoch, (len(x_train), len(x_test))))
    print(ema.explain())  # what these EMA settings mean: half-life, warnings
    precise_bn = not args.no_precise_bn
    if precise_bn:
        batches = min(NUM_SAMPLES_PRECISE // args.batch_size, steps_per_epoch)
        print(f"Precise BN statistics after every epoch, from {batches} training batches")

    workdir = os.path.abspath(args.workdir)
    history: list[dict[str, float]] = []
    options = ocp.CheckpointManagerOptions(max_to_keep=2, create=True)
    with (
        ocp.CheckpointManager(
            os.path.join(workdir, "checkpoints"),
            item_handlers=ocp.StandardCheckpointHandler(),
            options=options,
        ) as manager,
        # The kept EMA weights carry the statistics they were evaluated with.
        ema_jax.BestCheckpoints(
            os.path.join(workdir, "best"),
            ema_metric="ema_precise_accuracy" if precise_bn else "ema_accuracy",
        ) as best,
    ):
        if manager.latest_step() is not None:
            # The newest step whose arrays match their checksums; a damaged newer one
            # is skipped with a warning naming it.
            try:
                state = ema_jax.restore_checkpoint(manager, state)
            except ema_jax.EmaSettingsMismatchError as err:
                sys.exit(
                    f"{workdir} holds a run with other settings ({err}); pass another --workdir"
                )
            restored = int(state.step)
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
        start = int(state.step) // steps_per_epoch
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
                state, _ = train_step(state, x_train[idx], y_train[idx])
                bar.update()
            accuracy, ema_accuracy = (float(a) for a in evaluate(state, x_eval, y_eval))
            row = {"epoch": epoch + 1, "accuracy": accuracy, "ema_accuracy": ema_accuracy}
            if precise_bn:  # pycls's end of epoch, on this epoch's training batches
                state = state.with_precise_batch_stats(
                    (
                        x_train[order[i * args.batch_size : (i + 1) * args.batch_size]]
                        for i in range(steps_per_epoch)
                    ),
                    num_samples=NUM_SAMPLES_PRECISE,
                )
                accuracy, ema_precise = (float(a) for a in evaluate(state, x_eval, y_eval))
                row |= {"accuracy": accuracy, "ema_precise_accuracy": ema_precise}
            history.append(row)
            bar.set_postfix(epoch=epoch + 1, raw=f"{accuracy:.3f}", ema=f"{ema_accuracy:.3f}")
            step = int(state.step)
            best.save(step, state, row)  # first, so that a resumed epoch offers it again
            # A copy: orbax writes the metadata in the background, after later epochs.
            meta = {"settings": settings, "history": [dict(r) for r in history]}
            ema_jax.save_checkpoint(manager, state, custom_metadata=meta)  # + checksums, EMA
        bar.close()
        best.wait_until_finished()
        by_step = {int(row["epoch"]) * steps_per_epoch: row for row in history}
        best_rows = {which: by_step[best.best_step(which)] for which in ("raw", "ema")}

    print_table(history, precise_bn)
    raw, ema_row = best_rows["raw"], best_rows["ema"]
    print(f"best raw: {raw['accuracy']:.4f} (epoch {raw['epoch']})")
    ema_metric = "ema_precise_accuracy" if precise_bn else "ema_accuracy"
    which = " (precise BN statistics)" if precise_bn else ""
    print(f"best EMA{which}: {ema_row[ema_metric]:.4f} (epoch {ema_row['epoch']})")
    nonfinite = int(state.ema_state.nonfinite_updates)
    print(f"EMA updates skipped for NaN/Inf weights: {nonfinite}")
    if not args.no_plot:
        plot(history, os.path.join(workdir, "curves.png"))
        print(f"wrote {os.path.join(workdir, 'curves.png')}")
    return {
        # One row per epoch: epoch, accuracy, ema_accuracy (averaged BN statistics)
        # and, with precise BN, ema_precise_accuracy.
        "history": history,
        "best": best_rows,  # {"raw": row, "ema": row} of the kept best checkpoints
        "trained_epochs": args.epochs - min(start, args.epochs),  # by this call
        "nonfinite_updates": nonfinite,
        "workdir": workdir,
    }


if __name__ == "__main__":
    main()

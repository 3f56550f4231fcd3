"""Post-hoc EMA on scikit-learn's digits: train once, choose the EMA's length afterwards.

Trains the CNN of ``train_digits.py`` once, keeping EDM2's power-function EMAs at
sigma_rel 0.05 and 0.10 (the trackers, snapshotted every ``--snapshot-every`` steps into
``--workdir``/snapshots) and, in the same pass, three more sigma_rels tracked directly
(``--direct``) to compare with. After training it reconstructs the EMA at a sweep of
sigma_rels from the snapshots (``ema_jax.posthoc.reconstruct``), evaluates each on a
validation split carved from the training data and on the test split, chooses sigma_rel
by the validation loss (never by the test split: that would tune on it), and prints a
table and writes ``posthoc.png``: test accuracy and loss against sigma_rel, post-hoc and
direct. Widths whose reconstruction residual is above ``posthoc.WARN_RESIDUAL`` (the
snapshots do not reach them) are marked and not chosen.

Every EMA uses its averaged BatchNorm statistics (the post-hoc ones are reconstructed
like the weights).

Run: python examples/posthoc_digits.py [--workdir workdir/posthoc_digits] [--epochs 20]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time
import warnings
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.model_selection import train_test_split

import ema_jax
from ema_jax import posthoc
from ema_jax import schedules

EXAMPLES = pathlib.Path(__file__).resolve().parent
if str(EXAMPLES) not in sys.path:  # imported by path (tests): train_digits.py is beside it
    sys.path.insert(0, str(EXAMPLES))

import train_digits  # noqa: E402  (the data, the model and the train step)

TRACKED = (0.05, 0.10)  # EDM2's
VALIDATION = 0.2  # of the training images, held out to choose sigma_rel


def load_splits(quick: bool) -> tuple[np.ndarray, ...]:
    """train_digits.py's train/test split, with a stratified validation split carved from
    the training images (``--quick`` then keeps 256 of the rest for training)."""
    x_train, y_train, x_test, y_test = train_digits.load_data(False)
    x_train, x_val, y_train, y_val = train_test_split(
        x_train, y_train, test_size=VALIDATION, random_state=1, stratify=y_train
    )
    if quick:
        x_train, y_train = x_train[:256], y_train[:256]
    return x_train, y_train, x_val, y_val, x_test, y_test


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default=os.path.join("workdir", "posthoc_digits"))
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2.0, help="SGD learning rate after warmup")
    parser.add_argument("--update-period", type=int, default=1, help="EMA update period")
    parser.add_argument("--snapshot-every", type=int, default=10, help="optimizer steps")
    parser.add_argument(
        "--snapshot-dtype", default=None, help="store snapshots as this (bfloat16 halves them)"
    )
    parser.add_argument(
        "--direct", default="0.03,0.07,0.15", help="sigma_rels also tracked directly"
    )
    parser.add_argument("--sweep", type=int, default=25, help="sigma_rels reconstructed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="6 short epochs on 256 images")
    parser.add_argument("--no-plot", action="store_true", help="do not write posthoc.png")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.snapshot_every, args.sweep = 6, 4, 7
    args.direct = tuple(float(s) for s in args.direct.split(","))
    return args


def create_state(args: argparse.Namespace, steps_per_epoch: int) -> ema_jax.EmaTrainState:
    """train_digits.py's model and optimizer, with power-function EMAs instead of pycls's."""
    model = train_digits.Cnn()
    variables = model.init(jax.random.key(args.seed), jnp.ones((1, 8, 8, 1)), train=False)
    lr = optax.warmup_constant_schedule(0.1 * args.lr, args.lr, warmup_steps=steps_per_epoch)

    def power(sigma_rel: float) -> schedules.PowerFunction:
        return schedules.power_function(
            sigma_rel=sigma_rel, batch_size=args.batch_size, update_period=args.update_period
        )

    # The trackers and the averages tracked directly, all in one pass.
    ema = ema_jax.ema({f"{s:g}": power(s) for s in (*TRACKED, *args.direct)})
    return ema_jax.EmaTrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        tx=optax.sgd(lr, momentum=0.9),
        ema=ema,
    )


@jax.jit
def evaluate(variables: Any, x: jax.Array, y: jax.Array) -> jax.Array:
    """Accuracy and mean cross-entropy on ``(x, y)``."""
    logits = train_digits.Cnn().apply(variables, x, train=False)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return jnp.stack([jnp.mean(jnp.argmax(logits, -1) == y), loss])


def plot(
    rows: list[dict[str, float]], direct: dict[float, list[float]], raw: list[float], path: str
) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    sweep = [r["sigma_rel"] for r in rows]
    for k, (ax, key, label, scale) in enumerate(
        zip(axes, ("accuracy", "loss"), ("test accuracy (%)", "test loss"), (100, 1), strict=True)
    ):
        ax.plot(sweep, [scale * r[key] for r in rows], ".-", label="post-hoc (reconstructed)")
        ax.plot(list(direct), [scale * m[k] for m in direct.values()], "o", mfc="none", ms=9,
                label="tracked directly")  # fmt: skip
        ax.axhline(scale * raw[k], color="gray", ls=":", label="raw weights")
        for s in TRACKED:
            ax.axvline(s, color="gray", lw=0.5)
        ax.set(xlabel="sigma_rel", ylabel=label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("Digits: one training run, the EMA length chosen afterwards (post-hoc EMA)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(
    argv: Sequence[str] | None = None,
    on_step: Callable[[ema_jax.EmaTrainState], None] | None = None,
) -> dict[str, Any]:
    """Trains once, reconstructs the sweep; ``on_step(state)`` before and after every step."""
    args = parse_args(argv)
    x_train, y_train, x_val, y_val, x_test, y_test = load_splits(args.quick)
    steps_per_epoch = len(x_train) // args.batch_size
    total = args.epochs * steps_per_epoch
    state = create_state(args, steps_per_epoch)
    directory = os.path.join(os.path.abspath(args.workdir), "snapshots")
    if os.path.isdir(directory) and os.listdir(directory):
        sys.exit(f"{directory} holds snapshots of an earlier run: pass another --workdir")
    print(
        f"{len(x_train)} training / {len(x_val)} validation / {len(x_test)} test images,"
        f" {total} steps; trackers"
        f" {TRACKED}, snapshots every {args.snapshot_every} steps; tracked directly {args.direct}"
    )
    if on_step is not None:
        on_step(state)
    start = time.perf_counter()
    names = [f"{s:g}" for s in TRACKED]
    with posthoc.Snapshots(
        directory, snapshot_every=args.snapshot_every, dtype=args.snapshot_dtype, which=names
    ) as snapshots:
        for epoch in range(args.epochs):
            order = np.random.default_rng([args.seed, epoch]).permutation(len(x_train))
            for i in range(steps_per_epoch):
                idx = order[i * args.batch_size : (i + 1) * args.batch_size]
                state, _ = train_digits.train_step(state, x_train[idx], y_train[idx])
                step = epoch * steps_per_epoch + i + 1
                snapshots.save(state, step=step, force=step == total)  # and the last step
                if on_step is not None:
                    on_step(state)
        snapshots.wait_until_finished()
        saved = snapshots.steps()
    train_s = time.perf_counter() - start
    disk = sum(
        os.path.getsize(os.path.join(folder, name))
        for folder, _, files in os.walk(directory)
        for name in files
    )

    splits = {"val": (jnp.asarray(x_val), jnp.asarray(y_val))}
    splits["test"] = (jnp.asarray(x_test), jnp.asarray(y_test))

    def metrics(variables: Any, split: str = "test") -> list[float]:
        return [float(v) for v in evaluate(variables, *splits[split])]

    raw = metrics({"params": state.params, "batch_stats": state.batch_stats})
    direct = {s: metrics(state.ema_variables(f"{s:g}")) for s in args.direct}
    sweep = sorted({*np.round(np.linspace(0.01, 0.25, args.sweep), 4).tolist(), *args.direct})
    start = time.perf_counter()
    with warnings.catch_warnings():  # the residual of every width is in the table
        warnings.simplefilter("ignore", posthoc.ExtrapolationWarning)
        results = posthoc.reconstruct(directory, sweep, allow_extrapolation=True)
    reconstruct_s = time.perf_counter() - start
    found = posthoc.coefficients(directory, sweep)
    rows = []
    for s, variables, c in zip(sweep, results, found, strict=True):
        acc, loss = metrics(variables)
        row = {"sigma_rel": s, "accuracy": acc, "loss": loss, "residual": c.residual}
        row["val_accuracy"], row["val_loss"] = metrics(variables, "val")
        if s in direct:
            tracked = state.ema_variables(f"{s:g}")
            gap = jax.tree.map(lambda a, b: np.max(np.abs(np.asarray(a) - b)), tracked, variables)
            scale = max(float(np.max(np.abs(x))) for x in jax.tree.leaves(tracked))
            row["direct_accuracy"], row["direct_loss"] = direct[s]
            row["max_gap"] = max(jax.tree.leaves(gap)) / scale
        rows.append(row)

    print("The EMA at each sigma_rel: validation loss, test accuracy and loss, post-hoc and"
          " tracked directly")  # fmt: skip
    print(
        f"{'sigma_rel':>9}  {'val loss':>8}  {'post-hoc':>8} {'loss':>7}  {'direct':>8} {'loss':>7}"
        f"  {'max |gap|':>9}  residual"
    )
    for r in rows:
        d = f"{r['direct_accuracy']:>8.4f} {r['direct_loss']:>7.4f}" if "max_gap" in r else " " * 16
        g = f"{r['max_gap']:>9.1e}" if "max_gap" in r else " " * 9
        flag = " *" if r["residual"] > posthoc.WARN_RESIDUAL else ""
        print(
            f"{r['sigma_rel']:>9.4g}  {r['val_loss']:>8.4f}  {r['accuracy']:>8.4f}"
            f" {r['loss']:>7.4f}  {d}  {g}  {r['residual']:.1e}{flag}"
        )
    reached = [r for r in rows if r["residual"] <= posthoc.WARN_RESIDUAL]
    chosen = min(reached or rows, key=lambda r: r["val_loss"])
    print(
        f"raw weights: test accuracy {raw[0]:.4f}, loss {raw[1]:.4f}; chosen on the validation"
        f" split: sigma_rel {chosen['sigma_rel']:g} (validation loss {chosen['val_loss']:.4f}),"
        f" test accuracy {chosen['accuracy']:.4f}, loss {chosen['loss']:.4f}"
    )
    print(
        "max |gap|: largest difference between the post-hoc and the directly tracked"
        " weights, relative to the largest weight; residual: relative L2 error of the"
        f" reconstructed profile (*: above {posthoc.WARN_RESIDUAL:g}, the snapshots do not"
        " reach that width; not chosen)"
    )
    print(
        f"training: {train_s:.1f} s with {len(saved)} snapshots ({disk / 2**10:.0f} KiB on"
        f" disk, {disk / len(saved) / 2**10:.1f} KiB each); reconstructing {len(sweep)}"
        f" sigma_rels from them: {reconstruct_s:.2f} s"
    )
    if not args.no_plot:
        path = os.path.join(os.path.abspath(args.workdir), "posthoc.png")
        plot(rows, direct, raw, path)
        print(f"wrote {path}")
    return {
        # One per swept sigma_rel: test accuracy, loss; val_accuracy, val_loss; residual;
        # where also tracked directly, direct_accuracy, direct_loss and max_gap.
        "rows": rows,
        "chosen": chosen,  # the row of the lowest validation loss among widths reached
        "direct": direct,  # sigma_rel -> [accuracy, loss] of the average tracked directly
        "raw": raw,  # [accuracy, loss] of the raw weights
        "state": state,
        "snapshots": directory,
        "steps": saved,
        "seconds": {"train": train_s, "reconstruct": reconstruct_s},
    }


if __name__ == "__main__":
    main()

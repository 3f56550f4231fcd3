"""The bad-input catalogue: every public entry point, every way to hold it wrong.

Each case names the entry point, what is wrong, the exact exception type and a
piece of the message that names the culprit. The count is printed at the end of
the test run (see conftest.py), with the checkpoint helpers' cases, which live in
tests/test_checkpoint.py and tests/test_checkpoint_integrity.py (damaged checkpoints,
changed EMA settings) beside their fixtures and carry the same ``bad_input`` mark.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from support.models import BnNet
from support.models import Mlp
from support.models import make_state

import ema_jax
from ema_jax.__main__ import main as cli_main


@dataclasses.dataclass(frozen=True)
class Case:
    entry: str  # the public entry point
    what: str  # what is wrong with the input
    call: Callable[[], Any]
    error: type[BaseException]
    text: str  # must appear in the message, verbatim

    @property
    def id(self) -> str:
        return f"{self.entry}: {self.what}"


GOOD = dict(ema_alpha=1e-5, batch_size=128, max_epoch=200)
EMA = ema_jax.normalized_ema(**GOOD)
TREE = {"dense": {"w": jnp.zeros((2, 3)), "b": jnp.zeros(3)}, "n": jnp.zeros((), jnp.int32)}
STATE = EMA.init(TREE)


def construct(**override: Any) -> Callable[[], Any]:
    return lambda: ema_jax.normalized_ema(**(GOOD | override))


def update_with(tree: Any, state: Any = STATE) -> Callable[[], Any]:
    return lambda: jax.jit(EMA.update)(tree, state)


def swap(tree: dict, path: tuple[str, ...], value: Any) -> dict:
    out = jax.tree.map(lambda x: x, tree)
    node = out
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return out


TRANSFORM_CASES = [
    Case(
        "normalized_ema",
        "negative ema_alpha",
        construct(ema_alpha=-1e-5),
        ValueError,
        "ema_alpha must be a finite number >= 0, got -1e-05",
    ),
    Case(
        "normalized_ema",
        "NaN ema_alpha",
        construct(ema_alpha=float("nan")),
        ValueError,
        "ema_alpha must be a finite number >= 0, got nan",
    ),
    Case(
        "normalized_ema",
        "infinite ema_alpha",
        construct(ema_alpha=float("inf")),
        ValueError,
        "ema_alpha must be a finite number >= 0, got inf",
    ),
    Case(
        "normalized_ema",
        "string ema_alpha",
        construct(ema_alpha="1e-5"),
        ValueError,
        "ema_alpha must be a finite number >= 0, got '1e-5'",
    ),
    Case(
        "normalized_ema",
        "zero batch_size",
        construct(batch_size=0),
        ValueError,
        "batch_size must be a finite number > 0, got 0",
    ),
    Case(
        "normalized_ema",
        "negative batch_size",
        construct(batch_size=-128),
        ValueError,
        "batch_size must be a finite number > 0, got -128",
    ),
    Case(
        "normalized_ema",
        "None batch_size",
        construct(batch_size=None),
        ValueError,
        "batch_size must be a finite number > 0, got None",
    ),
    Case(
        "normalized_ema",
        "bool batch_size",
        construct(batch_size=True),
        ValueError,
        "batch_size must be a finite number > 0, got True",
    ),
    Case(
        "normalized_ema",
        "zero max_epoch",
        construct(max_epoch=0),
        ValueError,
        "max_epoch must be a finite number > 0, got 0",
    ),
    Case(
        "normalized_ema",
        "infinite max_epoch",
        construct(max_epoch=float("inf")),
        ValueError,
        "max_epoch must be a finite number > 0, got inf",
    ),
    Case(
        "normalized_ema",
        "negative update_period",
        construct(update_period=-1),
        ValueError,
        "update_period must be an integer in [0, 2**31 - 1], got -1",
    ),
    Case(
        "normalized_ema",
        "fractional update_period",
        construct(update_period=2.5),
        ValueError,
        "update_period must be an integer in [0, 2**31 - 1], got 2.5",
    ),
    Case(
        "normalized_ema",
        "update_period past int32",
        construct(update_period=2**31),
        ValueError,
        "update_period must be an integer in [0, 2**31 - 1], got 2147483648",
    ),
    Case(
        "normalized_ema",
        "negative warmup_epochs",
        construct(warmup_epochs=-1, steps_per_epoch=10),
        ValueError,
        "warmup_epochs must be an integer in [0, 2**31 - 1], got -1",
    ),
    Case(
        "normalized_ema",
        "warmup without steps_per_epoch",
        construct(warmup_epochs=2),
        ValueError,
        "warmup_epochs=2 needs steps_per_epoch",
    ),
    Case(
        "normalized_ema",
        "zero steps_per_epoch",
        construct(steps_per_epoch=0),
        ValueError,
        "steps_per_epoch must be an integer in [1, 2**31 - 1], got 0",
    ),
    Case(
        "normalized_ema",
        "float steps_per_epoch",
        construct(steps_per_epoch=3.0),
        ValueError,
        "steps_per_epoch must be an integer in [1, 2**31 - 1], got 3.0",
    ),
    Case(
        "normalized_ema",
        "unknown rule",
        construct(rule="cosine"),
        ValueError,
        "rule must be one of ('linear', 'exact'), got 'cosine'",
    ),
    Case(
        "normalized_ema",
        "integer ema_dtype",
        construct(ema_dtype=jnp.int32),
        ValueError,
        "ema_dtype must be a floating dtype or None, got",
    ),
    Case(
        "normalized_ema",
        "unknown ema_dtype",
        construct(ema_dtype="not-a-dtype"),
        ValueError,
        "ema_dtype must be a floating dtype or None, got 'not-a-dtype'",
    ),
    Case(
        "normalized_ema",
        "string skip_nonfinite",
        construct(skip_nonfinite="yes"),
        ValueError,
        "skip_nonfinite must be a bool, got 'yes'",
    ),
    Case(
        "normalized_ema",
        "positional hyperparameters",
        lambda: ema_jax.normalized_ema(1e-5, 128, 200),
        TypeError,
        "positional argument",
    ),
    Case(
        "NormalizedEma.init",
        "string leaf",
        lambda: EMA.init({"a": "x"}),
        TypeError,
        "params['a'] must be a numeric array, got str",
    ),
    Case(
        "NormalizedEma.init",
        "object leaf",
        lambda: EMA.init({"a": [1.0, object()]}),
        TypeError,
        "params['a'][1] must be a numeric array, got object",
    ),
    Case(
        "NormalizedEma.init",
        "array of strings",
        lambda: EMA.init({"a": np.array(["x"])}),
        TypeError,
        "params['a'] must be a numeric array, got ndarray",
    ),
    Case(
        "NormalizedEma.update",
        "a leaf missing",
        update_with({"dense": {"w": jnp.zeros((2, 3))}, "n": jnp.zeros((), jnp.int32)}),
        ValueError,
        "the EMA's leaf dense.b is not in params",
    ),
    Case(
        "NormalizedEma.update",
        "an extra leaf",
        update_with(swap(TREE, ("dense", "c"), jnp.zeros(1))),
        ValueError,
        "params' leaf dense.c is not in the EMA",
    ),
    Case(
        "NormalizedEma.update",
        "a leaf of another shape",
        update_with(swap(TREE, ("dense", "w"), jnp.zeros((3, 2)))),
        ValueError,
        "dense.w has shape (3, 2) in params but (2, 3) in the EMA",
    ),
    Case(
        "NormalizedEma.update",
        "a float leaf where the EMA has ints",
        update_with(swap(TREE, ("n",), jnp.zeros(()))),
        ValueError,
        "n has dtype float32 in params but int32 in the EMA",
    ),
    Case(
        "NormalizedEma.update",
        "an int leaf where the EMA has floats",
        update_with(swap(TREE, ("dense", "w"), jnp.zeros((2, 3), jnp.int32))),
        ValueError,
        "dense.w has dtype int32 in params but float32 in the EMA",
    ),
    Case(
        "NormalizedEma.update",
        "an EMA of another model",
        update_with({"other": TREE["dense"], "n": TREE["n"]}),
        ValueError,
        "the EMA's leaf dense.b is not in params",
    ),
    Case(
        "NormalizedEma.update",
        "arguments swapped",
        lambda: EMA.update(STATE, TREE),
        TypeError,
        "the order is update(params, state)",
    ),
    Case(
        "NormalizedEma.update",
        "a state that is not an EmaState",
        lambda: EMA.update(TREE, {"step": 0}),
        TypeError,
        "state must be the EmaState that init returned, got dict",
    ),
]

TRAIN_EMA = ema_jax.normalized_ema(ema_alpha=1e-2, batch_size=4, max_epoch=2, update_period=1)


def apply_gradients(model: Any, **kwargs: Any) -> Callable[[], Any]:
    def call() -> Any:
        state = make_state(model, TRAIN_EMA)
        grads = jax.tree.map(jnp.zeros_like, state.params)
        return state.apply_gradients(grads=grads, **kwargs)

    return call


def state_with_ema_of(other: Any) -> Callable[[], Any]:
    def call() -> Any:
        state = make_state(Mlp(), TRAIN_EMA)
        foreign = make_state(other, TRAIN_EMA).ema_state
        grads = jax.tree.map(jnp.zeros_like, state.params)
        return state.replace(ema_state=foreign).apply_gradients(grads=grads)

    return call


TRAIN_STATE_CASES = [
    Case(
        "EmaTrainState.create",
        "a decay instead of a transform",
        lambda: ema_jax.EmaTrainState.create(
            apply_fn=None, params={}, tx=optax.sgd(0.1), ema=0.999
        ),
        TypeError,
        "ema must be a transform from ema_jax.ema(schedule) (or ema_jax.normalized_ema,"
        " ema_jax.bema), got 0.999",
    ),
    Case(
        "EmaTrainState.create",
        "an optax transform as ema",
        lambda: ema_jax.EmaTrainState.create(
            apply_fn=None, params={}, tx=optax.sgd(0.1), ema=optax.ema(0.9)
        ),
        TypeError,
        "ema must be a transform from ema_jax.ema(schedule)",
    ),
    Case(
        "EmaTrainState.create",
        "no optimizer",
        lambda: ema_jax.EmaTrainState.create(apply_fn=None, params={}, tx=None, ema=TRAIN_EMA),
        TypeError,
        "tx must be an optax.GradientTransformation (with init and update), got None",
    ),
    Case(
        "EmaTrainState.create",
        "a non-numeric parameter",
        lambda: ema_jax.EmaTrainState.create(
            apply_fn=None, params={"w": "x"}, tx=optax.identity(), ema=TRAIN_EMA
        ),
        TypeError,
        "params['params']['w'] must be a numeric array, got str",
    ),
    Case(
        "EmaTrainState.apply_gradients",
        "batch_stats missing for a BatchNorm model",
        apply_gradients(BnNet()),
        ValueError,
        "but the state has batch_stats",
    ),
    Case(
        "EmaTrainState.apply_gradients",
        "batch_stats for a model without them",
        apply_gradients(Mlp(), batch_stats={"m": jnp.zeros(2)}),
        ValueError,
        "but the state has no batch_stats",
    ),
    Case(
        "EmaTrainState.apply_gradients",
        "an EMA from another model",
        state_with_ema_of(BnNet()),
        ValueError,
        "params do not match the EMA",
    ),
]

CIFAR = ["--ema-alpha", "2.5e-4", "--batch-size", "128", "--max-epoch", "100"]


def cli(*args: str) -> Callable[[], Any]:
    """Runs ``python -m ema_jax`` in-process; its exit becomes a SystemExit whose
    message is the exit code and the one line it printed on stderr."""

    def call() -> Any:
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                cli_main(list(args))
            except SystemExit as stop:
                lines = err.getvalue().splitlines()
                assert stop.code == 2 and len(lines) == 1, (stop.code, lines)
                raise SystemExit(f"exit {stop.code}: {lines[0]}") from None
        return None

    return call


CLI_CASES = [
    Case("python -m ema_jax", "no command", cli(), SystemExit, "exit 2: "),
    Case(
        "python -m ema_jax",
        "unknown command",
        cli("frobnicate"),
        SystemExit,
        "invalid choice: 'frobnicate'",
    ),
    Case(
        "python -m ema_jax explain",
        "missing --ema-alpha",
        cli("explain", *CIFAR[2:]),
        SystemExit,
        "--ema-alpha",
    ),
    Case(
        "python -m ema_jax explain",
        "word for a number",
        cli("explain", *CIFAR, "--update-period", "often"),
        SystemExit,
        "update_period must be a number, got 'often'",
    ),
    Case(
        "python -m ema_jax explain",
        "negative ema_alpha",
        cli("explain", "--ema-alpha", "-1", *CIFAR[2:]),
        SystemExit,
        "ema_alpha must be a finite number >= 0, got -1",
    ),
    Case(
        "python -m ema_jax explain",
        "zero batch size",
        cli("explain", *CIFAR[:2], "--batch-size", "0", *CIFAR[4:]),
        SystemExit,
        "batch_size must be a finite number > 0, got 0",
    ),
    Case(
        "python -m ema_jax explain",
        "NaN max epoch",
        cli("explain", *CIFAR[:4], "--max-epoch", "nan"),
        SystemExit,
        "max_epoch must be a finite number > 0, got nan",
    ),
    Case(
        "python -m ema_jax explain",
        "unknown rule",
        cli("explain", *CIFAR, "--rule", "cos"),
        SystemExit,
        "invalid choice: 'cos'",
    ),
    Case(
        "python -m ema_jax explain",
        "integer dtype",
        cli("explain", *CIFAR, "--dtype", "int8"),
        SystemExit,
        "int8",
    ),
    Case(
        "python -m ema_jax explain",
        "unknown option",
        cli("explain", *CIFAR, "--bogus"),
        SystemExit,
        "--bogus",
    ),
]

CATALOGUE = TRANSFORM_CASES + TRAIN_STATE_CASES + CLI_CASES


@pytest.mark.bad_input
@pytest.mark.parametrize("case", CATALOGUE, ids=lambda c: c.id)
def test_bad_input_raises_a_clear_error(case):
    with pytest.raises(case.error, match=re.escape(case.text)):
        case.call()


def test_every_error_type_is_exact():
    # pytest.raises accepts subclasses; the catalogue promises exact types.
    for case in CATALOGUE:
        try:
            case.call()
        except BaseException as err:  # SystemExit too: the CLI cases
            assert type(err) is case.error, (case.id, type(err))
        else:
            raise AssertionError(f"{case.id}: no error")

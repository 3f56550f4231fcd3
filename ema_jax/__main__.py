"""Command line: ``python -m ema_jax explain --ema-alpha ... --batch-size ... --max-epoch ...``.

Prints what the EMA hyperparameters mean (see :func:`ema_jax.explain`), as a table or,
with ``--json``, as one JSON object. Bad arguments give a one-line error and exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any
from typing import NoReturn

from ema_jax import _report as _explain
from ema_jax import _validate as _schedule


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr (no usage), exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}\n")


def _number(name: str, text: str) -> int | float:
    """``text`` as an int if it reads as one, else a float; the range checks come later."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    raise ValueError(f"{name} must be a number, got {text!r}")


NUMBERS = (
    ("ema_alpha", "base rate, pycls's EMA_ALPHA (1e-5 ImageNet, 2.5e-4 CIFAR)"),
    ("batch_size", "global batch size, all devices together"),
    ("max_epoch", "schedule length in epochs"),
    ("update_period", "update the EMA every this many optimizer steps (default: 32)"),
    ("warmup_epochs", "epochs during which the EMA copies the weights (default: 0)"),
    ("steps_per_epoch", "optimizer steps per epoch"),
    ("dataset_size", "samples per epoch; steps_per_epoch = dataset_size // batch_size"),
)
REQUIRED = ("ema_alpha", "batch_size", "max_epoch")
DEFAULTS = {"update_period": "32", "warmup_epochs": "0"}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m ema_jax",
        description="Tools for pycls's normalized EMA of model weights.",
        allow_abbrev=False,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    explain = commands.add_parser(
        "explain",
        help="what EMA hyperparameters mean: alphas, half-lives, warnings",
        description=(
            "What pycls's EMA hyperparameters mean, before a training run is spent on"
            " them: the per-update alpha under both rules, the updates in the run, the"
            " half-life in updates, steps, samples, epochs and as a fraction of training,"
            " and warnings. The math is in docs/math.md."
        ),
        allow_abbrev=False,
    )
    for name, help_text in NUMBERS:
        explain.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            metavar="N",
            required=name in REQUIRED,
            default=DEFAULTS.get(name),
            help=help_text,
        )
    explain.add_argument(
        "--rule",
        choices=_schedule.RULES,
        default="linear",
        help="the alpha the half-lives use: linear (pycls, default) or exact",
    )
    explain.add_argument(
        "--dtype",
        default="float32",
        help="the EMA's dtype, for the resolution check (default: float32; bfloat16, ...)",
    )
    explain.add_argument("--json", action="store_true", help="print one JSON object")
    explain.set_defaults(parser=explain)  # errors name the subcommand
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        numbers: dict[str, Any] = {
            name: _number(name, getattr(args, name))
            for name, _ in NUMBERS
            if getattr(args, name) is not None
        }
        report = _explain.explain(**numbers, rule=args.rule, dtype=args.dtype)
    except ValueError as error:
        args.parser.error(str(error))
    if args.json:
        print(json.dumps(report.to_dict(), allow_nan=False))
    else:
        print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())

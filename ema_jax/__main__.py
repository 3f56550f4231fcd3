"""Command line: ``python -m ema_jax explain [--schedule NAME] --OPTION VALUE ...``.

Prints what an EMA schedule means (see :func:`ema_jax.explain`), as a table or, with
``--json``, as one JSON object. Each schedule's options are its hyperparameters, read
from the schedule classes themselves. Bad arguments give a one-line error and exit 2.

``python -m ema_jax posthoc --dir DIR (--list | --sigma-rel S,... --out OUT [--step N])``
lists post-hoc snapshots or writes reconstructions (see :mod:`ema_jax.posthoc`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any
from typing import NoReturn

from ema_jax import _report
from ema_jax import schedules
from ema_jax.posthoc import _cli as _posthoc_cli

SCHEDULES: dict[str, type[schedules.Schedule]] = {
    cls.name: cls
    for cls in (
        schedules.Pycls,
        schedules.Constant,
        schedules.WarmupPower,
        schedules.TfWarmup,
        schedules.PowerFunction,
        schedules.Halflife,
        schedules.FractionOfTraining,
    )
}
HELP = {
    "ema_alpha": "pycls: base rate, EMA_ALPHA (1e-5 ImageNet, 2.5e-4 CIFAR)",
    "batch_size": "global batch size per optimizer step, all devices together",
    "max_epoch": "pycls: schedule length in epochs",
    "update_period": "update the EMA every this many optimizer steps",
    "warmup_epochs": "pycls: epochs during which the EMA copies the weights",
    "steps_per_epoch": "pycls: optimizer steps per epoch",
    "rule": "pycls: the alpha the half-lives use: linear (pycls) or exact",
    "form": "constant: how it blends, lerp (default) or nnx (flax nnx.EMA's, bit for bit)",
    "dataset_size": "pycls: samples per epoch; steps_per_epoch = dataset_size // batch_size",
    "total_steps": "optimizer steps in the run (for the share of training)",
}
CHOICES = {"rule": schedules._pycls.RULES, "form": schedules._constant.FORMS}
EXTRA = ("dataset_size", "total_steps")  # explain's own options


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


def _options() -> dict[str, dict[str, Any]]:
    """Every schedule's hyperparameters: which schedules take each, and whether required."""
    options: dict[str, dict[str, Any]] = {}
    for name, cls in SCHEDULES.items():
        for field in dataclasses.fields(cls):  # type: ignore[arg-type]  # dataclasses all
            if not field.init:
                continue
            entry = options.setdefault(field.name, {"schedules": [], "required": []})
            entry["schedules"].append(name)
            if field.default is dataclasses.MISSING:
                entry["required"].append(name)
            entry["bool"] = field.type in ("bool", bool)
    return options


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m ema_jax",
        description="Tools for the EMA of model weights.",
        allow_abbrev=False,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    explain = commands.add_parser(
        "explain",
        help="what an EMA schedule means: step sizes, half-lives, warnings",
        description=(
            "What an EMA schedule's hyperparameters mean, before a training run is spent on"
            " them. pycls (the default): the per-update alpha under both rules, the updates"
            " in the run, the half-life in updates, steps, samples, epochs and as a fraction"
            " of training, and warnings. Other schedules: the step sizes over the run, the"
            " half-lives at its end, and warnings. The math is in docs/math.md."
        ),
        allow_abbrev=False,
    )
    explain.add_argument(
        "--schedule", choices=sorted(SCHEDULES), default="pycls", help="default: pycls"
    )
    for name, entry in _options().items():
        which = ", ".join(entry["schedules"])
        help_text = f"{HELP.get(name, name.replace('_', ' '))} [{which}]"
        if entry["bool"]:
            explain.add_argument(
                _flag(name), dest=name, action="store_true", default=None, help=help_text
            )
        else:
            explain.add_argument(
                _flag(name), dest=name, metavar="N", choices=CHOICES.get(name), help=help_text
            )
    for name in EXTRA:
        if name not in _options():
            explain.add_argument(_flag(name), dest=name, metavar="N", help=HELP[name])
    explain.add_argument(
        "--dtype",
        default="float32",
        help="the EMA's dtype, for the resolution check (default: float32; bfloat16, ...)",
    )
    explain.add_argument("--json", action="store_true", help="print one JSON object")
    explain.set_defaults(parser=explain)  # errors name the subcommand
    _posthoc_cli.add_parser(commands)
    return parser


def _value(name: str, text: Any) -> Any:
    if isinstance(text, bool) or name in CHOICES:
        return text
    return _number(name, text)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "posthoc":
        return _posthoc_cli.main(args)
    cls, options = SCHEDULES[args.schedule], _options()
    given = {n: getattr(args, n) for n in [*options, *EXTRA] if getattr(args, n) is not None}
    required = [n for n, entry in options.items() if args.schedule in entry["required"]]
    missing = [_flag(n) for n in required if n not in given]
    if missing:
        args.parser.error(f"the following arguments are required: {', '.join(missing)}")
    foreign = [
        _flag(n) for n in given if n not in EXTRA and args.schedule not in options[n]["schedules"]
    ]
    if foreign:
        args.parser.error(f"{', '.join(foreign)} does not apply to --schedule {args.schedule}")
    try:
        values = {n: _value(n, v) for n, v in given.items()}
        # An option that is the schedule's own hyperparameter goes to it, the rest to explain.
        hyper = {
            n: v
            for n, v in values.items()
            if args.schedule in options.get(n, {}).get("schedules", ())
        }
        extra = {n: v for n, v in values.items() if n not in hyper}
        if args.schedule == "pycls":
            report = _report.explain(**hyper, **extra, dtype=args.dtype)
        else:
            report = _report.explain(cls(**hyper), **extra, dtype=args.dtype)
    except (ValueError, TypeError) as error:
        args.parser.error(str(error))
    if args.json:
        print(json.dumps(report.to_dict(), allow_nan=False))
    else:
        print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())

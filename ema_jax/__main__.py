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
import inspect
import re
import sys
import textwrap
import typing
from typing import Any
from typing import NoReturn

from ema_jax import _explain
from ema_jax import schedules


def _families() -> dict[str, type[schedules.Schedule]]:
    """Every registered schedule family (:data:`ema_jax.schedules.REGISTRY`), pycls first."""
    registry = schedules.REGISTRY
    return {"pycls": registry["pycls"], **{n: c for n, c in registry.items() if n != "pycls"}}


SCHEDULES = _families()  # the families registered when this module was imported
HELP = {  # explain's own options and shared ones; a family's come from its docstring's Args
    "batch_size": "global batch size per optimizer step, all devices together",
    "update_period": "update the EMA every this many optimizer steps",
    "dataset_size": "pycls: samples per epoch; steps_per_epoch = dataset_size // batch_size",
    "total_steps": "optimizer steps in the run (for the share of training)",
}
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


def _documented_args(cls: type) -> dict[str, str]:
    """``{argument: its first sentence}`` from the "Args:" section of ``cls``'s docstring."""
    doc = inspect.getdoc(cls) or ""
    section = re.search(r"^Args:\n((?:[ ]+.*\n?|\n)*)", doc, re.MULTILINE)
    helps: dict[str, str] = {}
    name = None
    for line in (section.group(1) if section else "").splitlines():
        entry = re.match(r"^  (\w+): (.*)", line)
        if entry:
            name, helps[entry.group(1)] = entry.group(1), entry.group(2)
        elif name is not None and line.startswith("    "):
            helps[name] += " " + line.strip()
    return {n: _plain(h.split("; ")[0]) for n, h in helps.items()}


def _plain(text: str) -> str:
    """Docstring text for the terminal: no reST quotes, no final period."""
    return " ".join(text.replace("``", "").split()).rstrip(".")


def _kind(annotation: Any) -> tuple[str, tuple[str, ...] | None]:
    """How a field reads from the command line: "bool", "int", "real" or "choice"."""
    if typing.get_origin(annotation) is typing.Literal:
        return "choice", tuple(typing.get_args(annotation))
    args = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    if typing.get_origin(args[0]) is typing.Literal:
        return "choice", tuple(typing.get_args(args[0]))
    if args[0] is bool:
        return "bool", None
    return ("int", None) if args[0] is int else ("real", None)


def _options(families: dict[str, type[schedules.Schedule]] | None = None) -> dict[str, Any]:
    """Every family's hyperparameters: the families that take each, which require it,
    how it reads, and its help (from the first family whose docstring describes it)."""
    options: dict[str, dict[str, Any]] = {}
    for name, cls in (families or _families()).items():
        hints = typing.get_type_hints(cls)
        documented = _documented_args(cls)
        for field in dataclasses.fields(cls):  # type: ignore[arg-type]  # dataclasses all
            if not field.init:
                continue
            entry = options.setdefault(field.name, {"schedules": [], "required": [], "help": None})
            entry["schedules"].append(name)
            if field.default is dataclasses.MISSING:
                entry["required"].append(name)
            entry["kind"], entry["choices"] = _kind(hints[field.name])
            entry["help"] = HELP.get(field.name) or entry["help"] or documented.get(field.name)
    return options


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


METAVAR = {"int": "N", "real": "X"}


def build_parser() -> argparse.ArgumentParser:
    families = _families()
    parser = _Parser(
        prog="python -m ema_jax",
        description="Tools for the EMA of model weights.",
        allow_abbrev=False,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    listing = "\n".join(
        f"  {name:<22} {_plain((inspect.getdoc(cls) or name).splitlines()[0])}"
        for name, cls in families.items()
    )
    explain = commands.add_parser(
        "explain",
        help="what an EMA schedule means: step sizes, half-lives, warnings",
        description=textwrap.fill(
            "What an EMA schedule's hyperparameters mean, before a training run is spent on"
            " them. pycls (the default): the per-update alpha under both rules, the updates"
            " in the run, the half-life in updates, steps, samples, epochs and as a fraction"
            " of training, and warnings. Other schedules: the step sizes over the run, the"
            " half-lives at its end, and warnings. The math is in docs/math.md; each"
            " option names, in brackets, the schedules that take it.",
            width=79,
        ),
        epilog=f"schedules (--schedule NAME):\n{listing}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    explain.add_argument(
        "--schedule",
        choices=list(families),
        default="pycls",
        metavar="NAME",
        help=f"the schedule family, one of: {', '.join(families)} (default: pycls)",
    )
    options = _options(families)
    for name, entry in options.items():
        which = ", ".join(entry["schedules"])
        help_text = f"{entry['help'] or name.replace('_', ' ')} [{which}]"
        if entry["kind"] == "bool":
            explain.add_argument(
                _flag(name), dest=name, action="store_true", default=None, help=help_text
            )
        else:
            explain.add_argument(
                _flag(name),
                dest=name,
                metavar=None if entry["choices"] else METAVAR[entry["kind"]],
                choices=entry["choices"],
                help=help_text,
            )
    for name in EXTRA:
        if name not in options:
            explain.add_argument(_flag(name), dest=name, metavar="N", help=HELP[name])
    explain.add_argument(
        "--dtype",
        default="float32",
        metavar="DTYPE",
        help="the EMA's dtype, for the resolution check (default: float32; bfloat16, ...)",
    )
    explain.add_argument("--json", action="store_true", help="print one JSON object")
    explain.set_defaults(parser=explain)  # errors name the subcommand
    from ema_jax.posthoc import _cli as _posthoc_cli  # orbax: only for this subcommand

    _posthoc_cli.add_parser(commands)
    return parser


def _value(name: str, text: Any, options: dict[str, Any]) -> Any:
    if isinstance(text, bool) or options.get(name, {}).get("choices"):
        return text
    return _number(name, text)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "posthoc":
        from ema_jax.posthoc import _cli as _posthoc_cli

        return _posthoc_cli.main(args)
    cls, options = _families()[args.schedule], _options()
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
        values = {n: _value(n, v, options) for n, v in given.items()}
        # An option that is the schedule's own hyperparameter goes to it, the rest to explain.
        hyper = {
            n: v
            for n, v in values.items()
            if args.schedule in options.get(n, {}).get("schedules", ())
        }
        extra = {n: v for n, v in values.items() if n not in hyper}
        if args.schedule == "pycls":
            report = _explain.explain(**hyper, **extra, dtype=args.dtype)
        else:
            report = _explain.explain(cls(**hyper), **extra, dtype=args.dtype)
    except (ValueError, TypeError) as error:
        args.parser.error(str(error))
    if args.json:
        print(report.to_json())
    else:
        print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())

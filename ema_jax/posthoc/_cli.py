"""``python -m ema_jax posthoc``: list snapshots, write reconstructions as orbax checkpoints."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Any

import orbax.checkpoint as ocp

from ema_jax._checkpoint import RECORD_KEY
from ema_jax._checkpoint import CorruptCheckpointError
from ema_jax._checkpoint import make_record
from ema_jax.posthoc._checks import WARN_RESIDUAL
from ema_jax.posthoc._checks import ExtrapolationError
from ema_jax.posthoc._checks import ExtrapolationWarning
from ema_jax.posthoc._format import SnapshotMismatchError
from ema_jax.posthoc._format import SnapshotNotFoundError
from ema_jax.posthoc._format import disk_bytes
from ema_jax.posthoc._format import open_manager
from ema_jax.posthoc._format import read_info
from ema_jax.posthoc._reconstruct import coefficients
from ema_jax.posthoc._reconstruct import iter_reconstruct

DESCRIPTION = (
    "EDM2's post-hoc EMA: list the snapshots that ema_jax.posthoc.Snapshots wrote"
    " (--list), or reconstruct the EMA of each --sigma-rel at a snapshot step (default:"
    " the latest) and write it to --out as an orbax checkpoint per sigma_rel, named"
    " sigma_rel_<value>_step_<step>; read one with"
    " orbax.checkpoint.StandardCheckpointer().restore(path). See docs/posthoc.md."
)


def add_parser(commands: Any) -> argparse.ArgumentParser:
    """Adds the ``posthoc`` subcommand to ``commands`` (argparse subparsers)."""
    parser = commands.add_parser(
        "posthoc",
        help="post-hoc EMA: list snapshots, reconstruct any sigma_rel after training",
        description=DESCRIPTION,
        allow_abbrev=False,
    )
    parser.add_argument("--dir", required=True, metavar="DIR", help="the snapshot directory")
    parser.add_argument("--list", action="store_true", help="list the snapshots found")
    parser.add_argument(
        "--sigma-rel", metavar="S[,S...]", help="relative widths to reconstruct, e.g. 0.05,0.07"
    )
    parser.add_argument("--step", metavar="N", help="the snapshot step (default: the latest)")
    parser.add_argument("--out", metavar="OUT", help="where to write the reconstructions")
    parser.add_argument(
        "--allow-extrapolation",
        action="store_true",
        help="write widths the snapshots do not reach (residual above"
        f" {WARN_RESIDUAL:g}) with a warning instead of refusing them",
    )
    parser.set_defaults(parser=parser)
    return parser


def _sigma_rels(text: str) -> list[float]:
    values = []
    for part in text.split(","):
        try:
            values.append(float(part))
        except ValueError:
            raise ValueError(
                f"--sigma-rel must be numbers separated by commas, got {text!r}"
            ) from None
    return values


def _step(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"--step must be an integer, got {text!r}") from None


def main(args: argparse.Namespace) -> int:
    """Runs the subcommand; errors become one line on stderr and exit status 2."""
    parser = args.parser
    if args.list == (args.sigma_rel is not None):
        parser.error("give exactly one of --list and --sigma-rel")
    if args.sigma_rel is not None and args.out is None:
        parser.error("--sigma-rel needs --out, where the reconstructions go")
    if args.list and (args.out is not None or args.step is not None or args.allow_extrapolation):
        parser.error("--list takes no --out, --step or --allow-extrapolation")
    try:
        if args.list:
            print(listing(args.dir))
        else:
            sigma_rels, step = _sigma_rels(args.sigma_rel), _step(args.step)
            write(args.dir, sigma_rels, step, args.out, allow=args.allow_extrapolation)
    except (
        ValueError,
        SnapshotNotFoundError,
        SnapshotMismatchError,
        CorruptCheckpointError,
        FileExistsError,
    ) as error:
        parser.error(str(error))
    return 0


def listing(directory: str) -> str:
    """A table of the snapshots in ``directory``."""
    manager = open_manager(directory)
    try:
        rows = [(read_info(manager, s), disk_bytes(manager, s)) for s in manager.all_steps()]
    finally:
        manager.close()
    rows.sort(key=lambda row: row[0].step)
    first = rows[0][0]
    lines = [
        f"{len(rows)} snapshots in {directory} (model fingerprint {first.fingerprint},"
        f" {len(first.leaves)} leaves)",
        f"{'step':>8}  {'samples':>12}  {'dtype':>8}  {'disk':>10}  averages (sigma_rel / gamma)",
    ]
    for info, size in rows:
        averages = ", ".join(f"{a.name}: {a.sigma_rel:.4g} / {a.gamma:.4g}" for a in info.averages)
        dtype = info.dtype or "ema's"
        lines.append(
            f"{info.step:>8d}  {max(a.time for a in info.averages):>12.6g}  {dtype:>8}"
            f"  {_size(size):>10}  {averages}"
        )
    return "\n".join(lines)


def _size(count: int) -> str:
    """Bytes in binary units: ``"812 B"``, ``"14.2 KiB"``, ``"97.7 MiB"``, ``"1.19 GiB"``."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= scale:
            return f"{count / scale:.3g} {unit}"
    return f"{count} B"


def write(
    directory: str, sigma_rels: list[float], step: int | None, out: str, *, allow: bool = False
) -> list[str]:
    """Reconstructs each ``sigma_rel`` and saves it under ``out``; returns the paths.

    The widths are reconstructed in batches that fit ``_leafwise.MEMORY_BUDGET`` with
    their results, each written before the next batch is summed. Without ``allow``, a
    width whose residual is above WARN_RESIDUAL is refused (ExtrapolationError) before
    anything is read or written; with it, each such width is written and warned about
    on stderr.
    """
    found = coefficients(directory, sigma_rels, step=step)
    step = found[0].step
    flagged = [c for c in found if c.residual > WARN_RESIDUAL]
    if flagged and not allow:
        c = flagged[0]
        raise ExtrapolationError(
            f"--sigma-rel {c.sigma_rel:g} is beyond what the snapshots reach: residual"
            f" {c.residual:.2g} > {WARN_RESIDUAL:g} at step {c.step} ("
            + ", ".join(f"{f.sigma_rel:g}: {f.residual:.2g}" for f in flagged)
            + "); track widths around it or save more snapshots (docs/posthoc.md, 'Choosing"
            " sigma_rel'), or pass --allow-extrapolation to write it anyway"
        )
    paths = [os.path.abspath(os.path.join(out, f"sigma_rel_{s:g}_step_{step}")) for s in sigma_rels]
    existing = [p for p in paths if os.path.exists(p)]
    if existing:
        raise FileExistsError(f"{existing[0]} exists: pass another --out or remove it")
    print(f"{'sigma_rel':>9}  {'gamma':>7}  {'step':>8}  {'residual':>9}  {'sources':>7}  path")
    with warnings.catch_warnings(record=True) as caught, ocp.StandardCheckpointer() as checkpointer:
        warnings.simplefilter("always", ExtrapolationWarning)
        results = iter_reconstruct(
            directory, sigma_rels, step=step, like=None, allow=True, result_bytes=True
        )
        for k, variables in results:
            c, path = found[k], paths[k]
            record = make_record(variables, None)
            record["reconstruction"] = {
                "sigma_rel": c.sigma_rel,
                "gamma": c.gamma,
                "step": c.step,
                "time": c.time,
                "residual": c.residual,
                "snapshots": os.path.abspath(directory),
            }
            checkpointer.save(path, variables, custom_metadata={RECORD_KEY: record})
            checkpointer.wait_until_finished()  # one width's result in memory at a time
            del variables
            print(
                f"{c.sigma_rel:>9.4g}  {c.gamma:>7.3f}  {c.step:>8d}  {c.residual:>9.2e}"
                f"  {len(c.weights):>7d}  {path}"
            )
    for warning in caught:
        if issubclass(warning.category, ExtrapolationWarning):
            print(f"WARNING (--allow-extrapolation): {warning.message}", file=sys.stderr)
        else:
            warnings.warn(warning.message, warning.category, stacklevel=2)
    return paths

"""Generated blocks in a Markdown doc: ``<!-- BEGIN GENERATED: name -->`` ... ``END``.

Shared by the docs' table generators (math_tables.py, posthoc_tables.py), so that every
number in a doc comes from code and a test can check the doc holds it verbatim.
"""

from __future__ import annotations

import pathlib
import sys
from collections.abc import Mapping


def fill(doc: str, tables: Mapping[str, str], where: str) -> str:
    """``doc`` with every generated block replaced by its table; ``where`` names the doc.

    Raises:
      ValueError: the doc lacks the markers of one of ``tables``.
    """
    for name, table in tables.items():
        begin, end = f"<!-- BEGIN GENERATED: {name} -->", f"<!-- END GENERATED: {name} -->"
        start, stop = doc.find(begin), doc.find(end)
        if start < 0 or stop < start:
            raise ValueError(f"{where} lacks the block {begin} ... {end}")
        doc = doc[: start + len(begin)] + "\n" + table + "\n" + doc[stop:]
    return doc


def write_or_check(path: pathlib.Path, new: str, script: str, check: bool) -> int:
    """Writes ``new`` to the doc at ``path``; with ``check``, writes nothing and returns 1
    (naming ``script`` to run) if the doc differs. The main of every table generator."""
    if check:
        if new != path.read_text(encoding="utf-8"):
            print(f"{path} is out of date: run python {script}", file=sys.stderr)
            return 1
        return 0
    path.write_text(new, encoding="utf-8")
    return 0

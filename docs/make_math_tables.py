"""Writes the computed tables into docs/math.md, so that every number there comes from code.

Run: python docs/make_math_tables.py          (rewrites the generated blocks)
     python docs/make_math_tables.py --check  (exit 1 if the doc is out of date)
"""

from __future__ import annotations

import argparse
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "docs"))

import generated_blocks  # noqa: E402
import math_tables as _math_tables  # noqa: E402

DOC = ROOT / "docs" / "math.md"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check, write nothing")
    args = parser.parse_args()
    new = _math_tables.fill(DOC.read_text(encoding="utf-8"))
    return generated_blocks.write_or_check(DOC, new, "docs/make_math_tables.py", args.check)


if __name__ == "__main__":
    sys.exit(main())

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

import math_tables as _math_tables  # noqa: E402

DOC = ROOT / "docs" / "math.md"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check, write nothing")
    args = parser.parse_args()
    text = DOC.read_text(encoding="utf-8")
    new = _math_tables.fill(text)
    if args.check:
        if new != text:
            print(f"{DOC} is out of date: run python docs/make_math_tables.py", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(new, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())

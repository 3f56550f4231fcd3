"""The numbers in ``docs/math.md``, computed: rows for each table and their Markdown.

``python docs/make_math_tables.py`` writes the tables into the doc between
``<!-- BEGIN GENERATED: name -->`` and ``<!-- END GENERATED: name -->``;
``tests/test_math_doc.py`` checks that the doc holds them verbatim.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import ml_dtypes

from ema_jax import _explain
from ema_jax.schedules import _pycls as _schedule

import generated_blocks

IMAGENET_SIZE = 1_281_167
CIFAR_SIZE = 50_000
ERROR_XS = (1e-4, 1e-3, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
ERROR_LEVELS = (0.01, 0.05, 0.1)
SAMPLES_PER_UPDATE = 128 * 32  # pycls's defaults: batch 128, period 32
DTYPES = ("float32", "bfloat16", "float16")


class Recipe(NamedTuple):
    name: str
    ema_alpha: float
    batch_size: int
    update_period: int
    max_epoch: int
    warmup_epochs: int
    dataset_size: int

    def explain(self, **override: Any) -> _explain.EmaReport:
        """This recipe's report, with some arguments of :func:`explain` overridden."""
        _, *values = self
        return _explain.explain(**(dict(zip(self._fields[1:], values, strict=True)) | override))


RECIPES = (
    Recipe("pycls defaults, ImageNet", 1e-5, 128, 32, 200, 0, IMAGENET_SIZE),
    Recipe("ImageNet, batch 1024, 100 epochs", 1e-5, 1024, 32, 100, 0, IMAGENET_SIZE),
    Recipe("CIFAR-10, batch 128, 100 epochs", 2.5e-4, 128, 32, 100, 0, CIFAR_SIZE),
    *(
        Recipe(f"pycls cifar_best, {m} epochs", 2.5e-4, 1024, 32, m, 5, CIFAR_SIZE)
        for m in (50, 100, 200, 400)
    ),
)
CLAMP_CASES = tuple((a, n, 32) for a in (1e-5, 2.5e-4) for n in (128, 1024, 4096))


def linear_vs_exact_error(x: float) -> float:
    """``min(1, x) / (1 - exp(-x)) - 1``: the linear rule's relative error for large n*k."""
    return min(1.0, x) / -math.expm1(-x) - 1.0


def linear_vs_exact_table(
    xs: Sequence[float] = ERROR_XS, samples_per_update: int = SAMPLES_PER_UPDATE
) -> list[tuple[float, ...]]:
    """Rows ``(x, linear, exact, error, error at n*k, x/2)`` for ``x = ema_alpha*n*k/m``.

    ``exact`` is the exact alpha ``1 - (1 - x/(n*k))**(n*k)`` in its limit for large
    ``n*k``, ``1 - exp(-x)``, and ``error`` the linear rule's relative error against
    it; ``error at n*k`` uses the exact alpha at ``n*k = samples_per_update`` (through
    the transform's own ``alpha_exact``).
    """
    rows: list[tuple[float, ...]] = []
    for x in xs:
        at_nk = _schedule.alpha_exact(x / samples_per_update, samples_per_update, 1.0, 1)
        error_at_nk = _schedule.alpha_linear(x / samples_per_update, samples_per_update, 1.0, 1)
        rows.append(
            (
                x,
                min(1.0, x),
                -math.expm1(-x),
                linear_vs_exact_error(x),
                error_at_nk / at_nk - 1,
                x / 2,
            )
        )
    return rows


def error_threshold(level: float) -> float:
    """The ``x < 1`` at which the linear rule's relative error reaches ``level``."""
    lo, hi = 0.0, 1.0
    if not linear_vs_exact_error(hi) > level:
        raise ValueError(f"level must be below the largest error, got {level!r}")
    for _ in range(100):  # the error grows with x on (0, 1]
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if linear_vs_exact_error(mid) < level else (lo, mid)
    return hi


def _num(value: float, digits: int = 3) -> str:
    """``value`` to ``digits`` significant digits, with thousands separators from 1000 on."""
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.{digits}g}"


def _pct(value: float, digits: int = 3) -> str:
    return f"{100 * value:.{digits}g}%"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _error_md() -> str:
    rows = [
        (f"{x:g}", f"{lin:.5g}", f"{exact:.5g}", _pct(err), _pct(err_nk), _pct(half))
        for x, lin, exact, err, err_nk, half in linear_vs_exact_table()
    ]
    header = (
        "x",
        "linear `min(1, x)`",
        "exact `1 - exp(-x)`",
        "linear high by",
        f"linear high by, n·k = {SAMPLES_PER_UPDATE}",
        "x / 2",
    )
    return _table(header, rows)


def _thresholds_md() -> str:
    rows = [(_pct(level, 2), f"{error_threshold(level):.3g}") for level in ERROR_LEVELS]
    rows.append((_pct(linear_vs_exact_error(1.0)) + " (the most)", "1"))
    return _table(("linear rule too high by", "at x ="), rows)


def _recipe_alpha_md() -> str:
    rows = []
    for recipe in RECIPES:
        r = recipe.explain()
        x = r.ema_alpha * (r.batch_size / r.max_epoch * r.update_period)
        rows.append(
            (
                recipe.name,
                f"{r.ema_alpha:g}",
                f"{recipe.batch_size}",
                f"{r.update_period}",
                f"{recipe.max_epoch}",
                f"{recipe.warmup_epochs}",
                f"{x:.5g}",
                f"{r.alpha_exact:.5g}",
                _pct(r.linear_vs_exact_rel_diff, 2),
            )
        )
    header = (
        "recipe",
        "ema_alpha",
        "n",
        "k",
        "m",
        "w",
        "x = linear alpha",
        "exact alpha",
        "linear high by",
    )
    return _table(header, rows)


def _recipe_half_life_md() -> str:
    rows = []
    for recipe in RECIPES:
        r, exact = recipe.explain(), recipe.explain(rule="exact")
        assert r.steps_per_epoch is not None and r.cadence_speedup is not None
        assert r.half_life_epochs is not None and r.half_life_fraction is not None
        assert exact.half_life_fraction is not None
        c = r.ema_alpha * r.batch_size * r.steps_per_epoch
        rows.append(
            (
                recipe.name,
                f"{recipe.dataset_size:,}",
                f"{r.steps_per_epoch:,}",
                f"{r.updates_per_epoch}",
                f"{r.cadence_speedup:.4f}",
                f"{c:.4g}",
                _pct(math.log(2.0) / c),
                f"{r.half_life_epochs:.3g}",
                _pct(r.half_life_fraction),
                _pct(exact.half_life_fraction),
            )
        )
    header = (
        "recipe",
        "D",
        "I",
        "updates / epoch",
        "cadence speedup",
        "c = ema_alpha·n·I",
        "nominal share ln 2 / c",
        "half-life, epochs",
        "share of training",
        "share, exact rule",
    )
    return _table(header, rows)


def _clamp_md() -> str:
    x1 = error_threshold(0.01)
    rows = [
        (f"{a:g}", f"{n}", f"{k}", _num(a * n * k / x1), _num(a * n * k, 4))
        for a, n, k in CLAMP_CASES
    ]
    header = ("ema_alpha", "n", "k", "linear error > 1% when m <", "clamped when m <")
    return _table(header, rows)


def _dtype_md() -> str:
    rows = []
    for name in DTYPES:
        eps = float(ml_dtypes.finfo(_explain.resolve_dtype(name)).eps)
        rows.append((name, f"{eps:.3g}", f"{eps / 4:.3g}", f"{eps / 2:.3g}"))
    header = ("dtype", "eps", "never registers below (eps/4)", "always registers above (eps/2)")
    return _table(header, rows)


def _dtype_gaps_md() -> str:
    rows = []
    for recipe in RECIPES[:3]:
        alpha = recipe.explain().alpha
        cells = [recipe.name, f"{alpha:.4g}"]
        for name in DTYPES:
            r = recipe.explain(dtype=name)
            warned = any(w.startswith("dtype") for w in r.warnings)
            cells.append(_num(r.min_registered_gap) + (" (warning)" if warned else ""))
        rows.append(cells)
    header = ("recipe", "alpha", *(f"eps / (2 alpha), {name}" for name in DTYPES))
    return _table(header, rows)


def _dtype_fixes_md() -> str:
    base = RECIPES[0]
    options: list[tuple[str, dict[str, Any]]] = [
        ("bfloat16 EMA, k = 32", dict(dtype="bfloat16")),
        (
            "bfloat16 EMA, k = 256, exact rule",
            dict(dtype="bfloat16", update_period=256, rule="exact"),
        ),
        (
            "bfloat16 EMA, k = 1024, exact rule",
            dict(dtype="bfloat16", update_period=1024, rule="exact"),
        ),
        ("float32 EMA (`ema_dtype=jnp.float32`), k = 32", dict(dtype="float32")),
    ]
    rows = []
    for label, override in options:
        r = base.explain(**override)
        assert r.half_life_fraction is not None
        warned = "yes" if any(w.startswith("dtype") for w in r.warnings) else "no"
        rows.append(
            (
                label,
                f"{r.alpha:.4g}",
                f"{r.min_registered_gap:.3g}",
                warned,
                _pct(r.half_life_fraction),
            )
        )
    header = (
        "pycls defaults, ImageNet, with",
        "alpha",
        "eps / (2 alpha)",
        "dtype warning",
        "share of training",
    )
    return _table(header, rows)


def markdown_tables() -> dict[str, str]:
    """Every generated table of ``docs/math.md``, by name, as Markdown."""
    return {
        "linear-vs-exact": _error_md(),
        "error-thresholds": _thresholds_md(),
        "recipes-alpha": _recipe_alpha_md(),
        "recipes-half-life": _recipe_half_life_md(),
        "clamp": _clamp_md(),
        "dtype-resolution": _dtype_md(),
        "dtype-gaps": _dtype_gaps_md(),
        "dtype-fixes": _dtype_fixes_md(),
    }


def fill(doc: str, tables: dict[str, str] | None = None) -> str:
    """``doc`` with every generated block replaced by its current table."""
    tables = markdown_tables() if tables is None else tables
    return generated_blocks.fill(doc, tables, "docs/math.md")

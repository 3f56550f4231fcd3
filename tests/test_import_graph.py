"""The package's shape: a lean ``import ema_jax``, an import graph without circles, a core
that reaches for nothing above it.

Read from the source with ``ast`` (every import, those inside functions and the lazy
table of ``ema_jax/__init__.py`` included; ``if TYPE_CHECKING:`` blocks aside), and
checked in a fresh interpreter for what ``import ema_jax`` really loads.
"""

from __future__ import annotations

import ast
import os
import pathlib
import subprocess
import sys

import pytest

import ema_jax

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "ema_jax"
HEAVY = ("flax", "orbax", "tensorstore", "optax")  # what the core must not load


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(name: str) -> str:
    """The ema_jax module an import names (``ema_jax.linen.X``: the module X lives in)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def _is_type_checking(node: ast.If) -> bool:
    return "TYPE_CHECKING" in ast.unparse(node.test)


def imports_of(module: str) -> list[tuple[str, bool]]:
    """``(imported name, at module level?)`` for every import of ``module``.

    ``from X import Y`` gives ``X.Y`` when that is a module, else ``X``. The entries of
    a ``_LAZY`` table (``ema_jax/__init__.py``) count as imports inside a function.
    """
    path = MODULES[module]
    is_package = path.name == "__init__.py"
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for stmt in child.orelse:
                    visit_one(stmt, top)
                continue
            visit_one(child, top)

    def visit_one(node: ast.AST, top: bool) -> None:
        if isinstance(node, ast.Import):
            found.extend((alias.name, top) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module if is_package else module.rpartition(".")[0]
                for _ in range(node.level - 1):
                    anchor = anchor.rpartition(".")[0]
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.append((full if full in MODULES else base, top))
        elif isinstance(node, (ast.Assign, ast.AnnAssign)) and "_LAZY" in ast.unparse(
            node.targets[0] if isinstance(node, ast.Assign) else node.target
        ):
            found.extend(
                (c.value, False)
                for c in ast.walk(node)
                if isinstance(c, ast.Constant) and c.value in MODULES
            )
        inner = top and not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        visit(node, inner)

    visit(ast.parse(path.read_text(encoding="utf-8")), True)
    return found


def graph(module_level_only: bool = False) -> dict[str, set[str]]:
    edges = {}
    for module in MODULES:
        targets = {
            _resolve(name)
            for name, top in imports_of(module)
            if name.split(".")[0] == "ema_jax" and (top or not module_level_only)
        }
        edges[module] = targets - {module}
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(u: str) -> list[str] | None:
        state[u] = 1
        stack.append(u)
        for v in sorted(edges[u]):
            if state.get(v) == 1:
                return [*stack[stack.index(v) :], v]
            if v not in state and (cycle := visit(v)):
                return cycle
        stack.pop()
        state[u] = 2
        return None

    for module in sorted(edges):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def test_the_graph_reader_sees_lazy_imports_and_finds_circles():
    # The reader itself: the lazy table, an import inside a method, and a planted circle.
    assert "ema_jax.linen" in graph()["ema_jax"]
    assert "ema_jax.linen" not in graph(module_level_only=True)["ema_jax"]
    assert "ema_jax._explain" in graph()["ema_jax._transform"]
    planted = graph() | {"ema_jax._explain": graph()["ema_jax._explain"] | {"ema_jax._transform"}}
    cycle = find_cycle(planted)  # wherever the search enters the circle
    assert cycle is not None and cycle[0] == cycle[-1] and len(cycle) == 3, cycle
    assert set(cycle) == {"ema_jax._explain", "ema_jax._transform"}, cycle


def test_the_import_graph_has_no_circle():
    assert find_cycle(graph()) is None


CORE = ["ema_jax._transform", *(m for m in MODULES if m.startswith("ema_jax.schedules"))]
ABOVE_THE_CORE = (
    "ema_jax._explain",
    "ema_jax._report",
    "ema_jax._report_schedule",
    "ema_jax._report_text",
    "ema_jax.linen",
    "ema_jax.nnx",
    "ema_jax.posthoc",
    "ema_jax.__main__",
    "flax",
    "orbax",
    "tensorstore",
)


@pytest.mark.parametrize("module", CORE)
def test_the_core_imports_nothing_above_it_at_module_level(module):
    names = [name for name, top in imports_of(module) if top]
    assert names, module
    assert not [n for n in names if n.startswith(ABOVE_THE_CORE)], names


def test_the_transform_reaches_the_diagnostics_only_inside_ema_explain():
    tree = ast.parse(MODULES["ema_jax._transform"].read_text(encoding="utf-8"))
    where = [
        function.name
        for function in ast.walk(tree)
        if isinstance(function, ast.FunctionDef)
        for node in ast.walk(function)
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(ABOVE_THE_CORE)
    ]
    assert where == ["explain"]


def run_python(code: str) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_import_ema_jax_loads_no_flax_orbax_tensorstore_or_optax():
    code = "import sys, ema_jax\nprint(sorted({m.split('.')[0] for m in sys.modules} & set(HEAVY)))"
    loaded = run_python(code.replace("HEAVY", repr(HEAVY)))
    assert loaded.strip() == "[]"


def test_lazy_names_load_on_first_use_and_every_public_name_works():
    out = run_python(
        "import sys, ema_jax\n"
        "from ema_jax import EmaTrainState\n"
        "assert 'flax.linen' in sys.modules and EmaTrainState.__name__ == 'EmaTrainState'\n"
        "missing = [n for n in ema_jax.__all__ if getattr(ema_jax, n, None) is None]\n"
        "assert not missing, missing\n"
        "assert set(ema_jax.__all__) <= set(dir(ema_jax))\n"
        "assert ema_jax.posthoc.reconstruct and ema_jax.nnx.Ema and ema_jax.linen\n"
        "print('ok')\n"
    )
    assert out.strip() == "ok"


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="module 'ema_jax' has no attribute 'no_such'"):
        ema_jax.no_such  # noqa: B018
    assert not hasattr(ema_jax, "no_such")

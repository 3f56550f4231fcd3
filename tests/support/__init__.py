"""Helpers shared by the tests: running an EMA, tolerances, tree comparisons, HLO reading.

One place for what several test files need, so that no test file imports another.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

EPS32 = float(np.finfo(np.float32).eps)
BIG = 4096  # "parameter-sized" in the HLO helpers: arrays of at least this many entries


def run_ema(ema: Any, trajectory: list[Any], *, jit: bool = True) -> Any:
    """The EMA's state after folding in ``trajectory[1:]`` from ``init(trajectory[0])``."""
    update = jax.jit(ema.update, donate_argnums=1) if jit else ema.update
    state = ema.init(jax.tree.map(jnp.asarray, trajectory[0]))
    for params in trajectory[1:]:
        state = update(jax.tree.map(jnp.asarray, params), state)
    return state


def run_every_call(ema: Any, trajectory: list[Any]) -> list[Any]:
    """The jitted, donated EMA after every call, as NumPy trees."""
    update = jax.jit(ema.update, donate_argnums=1)
    state = ema.init(jax.tree.map(jnp.asarray, trajectory[0]))
    out = []
    for params in trajectory[1:]:
        state = update(jax.tree.map(jnp.asarray, params), state)
        out.append(jax.tree.map(np.asarray, state.ema))
    return out


def fp32_tolerance(trajectory: list[Any]) -> float:
    """Bound on float32 rounding after len(trajectory) steps vs a float64 reference.

    Each update rounds the EMA once or twice (a few ulp of the largest magnitude
    seen); the contraction (1 - alpha) only damps earlier errors, so after N updates
    the error is at most about 4 * N * eps32 * max|x|.
    """
    peak = max(float(np.max(np.abs(p["w"]))) for p in trajectory)
    return 4 * len(trajectory) * EPS32 * max(peak, 1.0)


def _by_path(tree: Any) -> dict[str, np.ndarray]:
    flat = jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in flat}


def assert_trees_equal(got: Any, want: Any) -> None:
    """Same leaves at the same paths, bit for bit and of the same dtypes.

    Compared by path, so static fields (``tx``, ``apply_fn``) and container types
    (``dict`` vs ``FrozenDict``) do not matter.
    """
    chex.assert_trees_all_equal(_by_path(got), _by_path(want), strict=True)


def assert_trees_close(got: Any, want: Any, atol: float) -> None:
    """Same paths; floating leaves within ``atol``, the others equal (compared in float64)."""
    got, want = _by_path(got), _by_path(want)
    assert list(got) == list(want)
    floats = [p for p, x in want.items() if np.issubdtype(x.dtype, np.inexact)]
    chex.assert_trees_all_close(
        {p: got[p].astype(np.float64) for p in floats},
        {p: want[p].astype(np.float64) for p in floats},
        rtol=0,
        atol=atol,
    )
    chex.assert_trees_all_equal(
        {p: got[p] for p in want if p not in floats}, {p: want[p] for p in want if p not in floats}
    )


# --- reading compiled HLO text ---------------------------------------------------------

_COMPUTATION = re.compile(r"^(?:ENTRY )?%(\S+) .*\{$")
_INSTRUCTION = re.compile(
    r"^\s+(?:ROOT )?%\S+ = (?P<shape>.*?) (?P<op>[a-z][a-z0-9-]*)\((?P<rest>.*)$"
)
_ARRAY = re.compile(r"[a-z0-9]+\[([0-9,]*)\]")


def computations(hlo: str) -> tuple[dict[str, list[tuple[str, str, str]]], str]:
    """Compiled HLO text as {name: [(shape, opcode, rest of line)]}, and the entry's name."""
    comps: dict[str, list[tuple[str, str, str]]] = {}
    entry, current = "", None
    for line in hlo.splitlines():
        header = _COMPUTATION.match(line)
        if header:
            current = comps.setdefault(header.group(1), [])
            entry = header.group(1) if line.startswith("ENTRY") else entry
            continue
        instruction = _INSTRUCTION.match(line)
        if instruction and current is not None:
            current.append(instruction.group("shape", "op", "rest"))
    return comps, entry


def is_big(shape: str) -> bool:
    """Whether any array in ``shape`` (possibly a tuple) has at least BIG entries."""
    for dims in _ARRAY.findall(shape):
        sizes = [int(d) for d in dims.split(",") if d]
        if int(np.prod(sizes)) >= BIG:
            return True
    return False


def called(rest: str, key: str) -> list[str]:
    found = re.search(key + r"=\{?([^}]*?)\}?(?:,\s[a-z_]+=|$)", rest)
    return [] if not found else [n.strip().lstrip("%") for n in found.group(1).split(",")]


def arithmetic(comps, name: str) -> set[str]:
    """Opcodes on big arrays in computation ``name`` and the fusions it calls."""
    ops = set()
    for shape, op, rest in comps[name]:
        if op == "fusion":
            for sub in called(rest, "calls"):
                ops |= arithmetic(comps, sub)
        elif is_big(shape) or (op == "reduce" and is_big(rest)):
            ops.add(op)
    return ops - {"parameter", "get-tuple-element", "tuple", "bitcast"}


# --- float error bounds for a linear model (gradient accumulation tests) ---------------

U32 = 2.0**-24  # float32 unit roundoff


def linear_gradient_error(x: np.ndarray, y: np.ndarray, kernel: Any, bias: Any) -> float:
    """Bound on the float32 error of the mean-squared-error gradient of ``x @ W + b``.

    With ``X~ = [x, 1]`` and the residual ``R = x W + b - y`` (at most ``d + 2``
    roundings per entry, d inputs), the gradient is ``2 / (o m) X~^T R`` for m rows
    and o outputs; its sum over m rows adds ``(m + 1) u`` relative to ``|X~|^T |R|``
    (Higham's gamma bound), and the residual's error is carried through ``|X~|^T``.
    """
    m, d = x.shape
    w, b = np.asarray(kernel, np.float64), np.asarray(bias, np.float64)
    outputs = w.shape[1]
    xt = np.concatenate([x, np.ones((m, 1))], axis=1).astype(np.float64)
    r = np.abs(x @ w + b - y)
    r_err = (d + 2) * U32 * (np.abs(x) @ np.abs(w) + np.abs(b) + np.abs(y))
    total = (m + 1) * U32 * np.abs(xt).T @ r + np.abs(xt).T @ r_err
    return float((2 / (outputs * m) * total).max())


def max_abs(tree: Any) -> float:
    return max(float(np.abs(np.asarray(a, np.float64)).max()) for a in jax.tree.leaves(tree))


def max_abs_diff(a: Any, b: Any) -> float:
    return max_abs(jax.tree.map(lambda u, v: np.asarray(u, np.float64) - v, a, b))


# --- workers on simulated devices --------------------------------------------------------


def run_device_worker(
    worker: Path, args: list[str], report: Path, *, devices: int = 8
) -> dict[str, str]:
    """Runs ``worker`` on ``devices`` simulated CPU devices; returns its JSON report.

    The report maps each check to "ok" or its traceback; ``{"*": why}`` when the worker
    failed as a whole (its exit status), with its output. It waits for the worker to
    end, however long a loaded machine takes: no wall-clock limit.
    """
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=flags.strip(),
        PYTHONPATH=os.pathsep.join([str(worker.parents[2]), str(worker.parents[1])]),
    )
    command = [sys.executable, str(worker), *args]
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    if proc.returncode != 0 or not report.exists():
        return {"*": f"worker exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"}
    return json.loads(report.read_text())


def check_device_result(results: dict[str, str], name: str) -> None:
    """Fails the calling test with the worker's traceback unless check ``name`` passed."""
    if "*" in results:
        pytest.fail(results["*"], pytrace=False)
    if results.get(name) != "ok":
        pytest.fail(f"{name}: {results.get(name, 'did not run')}", pytrace=False)

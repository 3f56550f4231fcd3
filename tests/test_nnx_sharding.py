"""`ema_jax.nnx.Ema` on 8 simulated CPU devices: on the model's shardings, no communication.

The checks live in nnx_sharding_worker.py and run in one subprocess, so that this
process keeps its single device; each check is a test of its own here, failing with
the worker's traceback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nnx_sharding_worker
import pytest

WORKER = Path(nnx_sharding_worker.__file__)
TIMEOUT_S = 240


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Runs the worker once; returns ``{check: "ok" | traceback}``."""
    workdir = tmp_path_factory.mktemp("nnx_sharding")
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8"
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=flags.strip(),
        PYTHONPATH=os.pathsep.join([str(WORKER.parent.parent), str(WORKER.parent)]),
    )
    try:
        proc = subprocess.run(
            [sys.executable, str(WORKER), str(workdir)],
            capture_output=True,
            text=True,
            env=env,
            timeout=TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as e:  # run() has killed the worker
        return {"*": f"worker timed out after {TIMEOUT_S} s:\n{e.stdout}\n{e.stderr}"}
    report = workdir / "nnx_sharding.json"
    if proc.returncode != 0 or not report.exists():
        return {"*": f"worker exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"}
    return json.loads(report.read_text())


@pytest.mark.parametrize("name", list(nnx_sharding_worker.CHECKS))
def test_on_8_simulated_devices(results, name):
    if "*" in results:
        pytest.fail(results["*"], pytrace=False)
    assert name in results, f"{name} did not run"
    if results[name] != "ok":
        pytest.fail(f"{name} failed in the worker:\n{results[name]}", pytrace=False)

"""The EMA follows the parameters' sharding on 8 simulated CPU devices, and costs no communication.

The checks live in sharding_worker.py and run in subprocesses, so that this
process keeps its single device: one on 8 devices (init, update, EmaTrainState,
train steps, collectives, memory, save and restore on 8, 4 and 1), then a fresh
one on 4 devices that restores the checkpoint the first wrote. Each check is a
test of its own here, failing with the worker's traceback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import sharding_worker

WORKER = Path(sharding_worker.__file__)
TIMEOUT_S = 240  # the 8-device group takes about 45 s on 2 busy cores
DEVICES = {"devices8": 8, "devices4": 4}


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, str]]:
    """Runs both groups, in order; returns ``{group: {check: "ok" | traceback}}``."""
    workdir = tmp_path_factory.mktemp("sharding")
    out = {}
    for group, devices in DEVICES.items():
        flags = (
            f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
        )
        env = dict(
            os.environ,
            JAX_PLATFORMS="cpu",
            XLA_FLAGS=flags.strip(),
            PYTHONPATH=os.pathsep.join([str(WORKER.parent.parent), str(WORKER.parent)]),
        )
        try:
            proc = subprocess.run(
                [sys.executable, str(WORKER), group, str(workdir)],
                capture_output=True,
                text=True,
                env=env,
                timeout=TIMEOUT_S,
            )
        except subprocess.TimeoutExpired as e:  # run() has killed the worker
            out[group] = {"*": f"worker timed out after {TIMEOUT_S} s:\n{e.stdout}\n{e.stderr}"}
            continue
        report = workdir / f"{group}.json"
        if proc.returncode != 0 or not report.exists():
            out[group] = {"*": f"worker exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"}
        else:
            out[group] = json.loads(report.read_text())
    return out


@pytest.mark.parametrize(
    ("group", "name"),
    [(group, name) for group, checks in sharding_worker.CHECKS.items() for name in checks],
    ids=lambda value: value,
)
def test_on_simulated_devices(results, group, name):
    got = results[group]
    if "*" in got:
        pytest.fail(got["*"], pytrace=False)
    assert name in got, f"{name} did not run"
    if got[name] != "ok":
        pytest.fail(f"{group}/{name} failed in the worker:\n{got[name]}", pytrace=False)

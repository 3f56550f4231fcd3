"""The EMA follows the parameters' sharding on 8 simulated CPU devices, and costs no communication.

The checks live in support/sharding_worker.py and run in subprocesses, so that this
process keeps its single device: one on 8 devices (init, update, EmaTrainState,
train steps, collectives, memory, save and restore on 8, 4 and 1), then a fresh
one on 4 devices that restores the checkpoint the first wrote. Each check is a
test of its own here, failing with the worker's traceback.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from support import run_device_worker
from support import sharding_worker

WORKER = Path(sharding_worker.__file__)
DEVICES = {"devices8": 8, "devices4": 4}  # the 8-device group takes about 45 s on 2 busy cores
# Slow, and all in one pytest-xdist worker (--dist loadgroup): the module fixture then
# starts each device worker once, instead of once per xdist worker on a loaded machine.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("sharding")]


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, str]]:
    """Runs both groups, in order; returns ``{group: {check: "ok" | traceback}}``.

    Each worker is waited for, however long a loaded machine takes (no time-out).
    """
    workdir = tmp_path_factory.mktemp("sharding")
    return {
        group: run_device_worker(
            WORKER, [group, str(workdir)], workdir / f"{group}.json", devices=devices
        )
        for group, devices in DEVICES.items()
    }


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

"""`ema_jax.nnx.Ema` on 8 simulated CPU devices: on the model's shardings, no communication.

The checks live in support/nnx_sharding_worker.py and run in one subprocess, so that this
process keeps its single device; each check is a test of its own here, failing with
the worker's traceback.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from support import check_device_result
from support import nnx_sharding_worker
from support import run_device_worker

WORKER = Path(nnx_sharding_worker.__file__)
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("nnx_sharding")]  # one worker start


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Runs the worker once; returns ``{check: "ok" | traceback}``."""
    workdir = tmp_path_factory.mktemp("nnx_sharding")
    return run_device_worker(WORKER, [str(workdir)], workdir / "nnx_sharding.json")


@pytest.mark.parametrize("name", list(nnx_sharding_worker.CHECKS))
def test_on_8_simulated_devices(results, name):
    check_device_result(results, name)

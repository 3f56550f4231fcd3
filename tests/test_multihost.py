"""Two processes on 127.0.0.1 train a sharded EmaTrainState, save, and restore re-sharded.

Each phase starts both processes of support/multihost_worker.py with 2 CPU devices each,
joined by jax.distributed over gloo; the EMA restored by fresh processes must be
bit-identical to the one saved. A host-resident EMA (``memory_kind="pinned_host"``) runs
in both processes of support/multihost_memory_worker.py, with 4 CPU devices each.
Every process runs in its own session, under a
and is killed with its group as soon as the other fails (it would wait for its peer
in a collective); otherwise both are waited for, however long a loaded machine takes.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from support import multihost_memory_worker
from support import multihost_worker
from support import sharded

WORKER = Path(multihost_worker.__file__)
MEMORY_WORKER = Path(multihost_memory_worker.__file__)
# The train and restore phases take about 15 s together on 2 free cores; the memory
# phase took 32 s against their 53 s in one run on 2 busy cores (load 5). One group, so
# that no two pairs of processes share the cores.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("multihost")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_phase(phase: str, workdir: Path, worker: Path = WORKER, devices: int = 2) -> float:
    """Runs both processes of ``phase`` (``devices`` CPU devices each); fails with their
    output if either fails."""
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=flags,
        PYTHONPATH=os.pathsep.join([str(worker.parents[2]), str(worker.parents[1])]),
    )
    port = free_port()
    logs = [workdir / f"{phase}_{i}.log" for i in range(2)]
    start = time.monotonic()
    procs = []
    try:
        for i, log in enumerate(logs):
            with log.open("w") as out:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, str(worker), phase, str(i), str(port), str(workdir)],
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        env=env,
                        start_new_session=True,
                    )
                )
        # A failed process leaves its peer waiting in a collective: stop at the first.
        while True:  # no deadline: a busy machine only makes them slower
            codes = [proc.poll() for proc in procs]
            if all(c == 0 for c in codes) or any(c not in (None, 0) for c in codes):
                break
            time.sleep(0.1)
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    codes = [proc.returncode for proc in procs]
    if codes != [0, 0]:
        report = "\n".join(
            f"--- process {i} (exit {c}):\n{logs[i].read_text()}" for i, c in enumerate(codes)
        )
        raise AssertionError(f"{phase} failed:\n{report}")
    return time.monotonic() - start


def single_device_ema() -> dict[str, np.ndarray]:
    """The training of the train phase, recomputed here on this process's one device."""
    layout = sharded.LAYOUTS[multihost_worker.TRAIN_LAYOUT]
    mesh = sharded.make_mesh(layout, shape=(1,), devices=jax.devices()[:1])
    state = sharded.create_state(sharded.make_ema())
    step = jax.jit(sharded.train_step)
    for i in range(multihost_worker.STEPS):
        state, _ = step(state, *sharded.global_batch(i, mesh, layout.batch_spec))
    flat = jax.tree_util.tree_flatten_with_path(dict(state.ema_state.ema))[0]
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in flat}


def test_two_processes_train_save_and_restore_the_same_ema(tmp_path):
    run_phase("train", tmp_path)
    # The 4-device, 2-process training computed what one device computes.
    saved = np.load(tmp_path / "ema.npz")
    want = single_device_ema()
    assert sorted(saved.files) == sorted(want)
    for path, value in want.items():
        np.testing.assert_allclose(saved[path], value, rtol=1e-5, atol=1e-6, err_msg=path)
    # Fresh processes restore it onto another layout, bit for bit (checked there).
    run_phase("restore", tmp_path)


def test_two_processes_keep_a_pinned_host_ema_on_the_host_through_a_checkpoint(tmp_path):
    """Each process checks its own shards (support/multihost_memory_worker.py): the EMA in
    pinned host memory with the parameters' spec, one average and two, through init, 20
    jitted donated updates, save_checkpoint and a verified restore_checkpoint, in
    post-hoc trackers and their snapshots, and in ema_jax.nnx.Ema; bit for bit the
    on-device EMA; out_shardings that put it on the device raise."""
    run_phase("memory", tmp_path, worker=MEMORY_WORKER, devices=4)

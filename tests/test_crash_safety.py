"""SIGKILL a training process at varied moments, mid-save included, and resume.

After every kill, the newest checkpoint orbax reports as complete must restore,
hold a step, parameters and EMA from one and the same step (checked bit for bit
against the same deterministic run recomputed here), and training must go on
from it. A half-written checkpoint is never offered: orbax writes a step into a
temporary directory and renames it into place only when the write is complete.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from support import crash_worker

KILLS = 12
WORKER = Path(crash_worker.__file__)


def reference_states(until: int) -> list:
    """The uninterrupted run: reference[s] is the state after s steps."""
    states = [crash_worker.initial_state()]
    while len(states) <= until:
        states.append(crash_worker.train_step(states[-1]))
    return states


def assert_same_state(got, want) -> None:
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def start_worker(workdir: Path) -> subprocess.Popen:
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(WORKER.parents[2]), str(WORKER.parents[1])])
    )
    return subprocess.Popen(
        [sys.executable, str(WORKER), str(workdir), "1000000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )


def kill_at(proc: subprocess.Popen, moment: str, rng: random.Random) -> None:
    """Reads the worker's lines until ``moment`` comes, then SIGKILLs it."""
    saves_to_see = rng.randint(1, 4)
    for line in proc.stdout:  # ends when the worker does: no deadline for a busy machine
        if moment == "at_start" and line.startswith("resumed"):
            break
        if line.startswith("saving"):
            saves_to_see -= 1
            if saves_to_see == 0:
                if moment == "after_delay":
                    time.sleep(rng.uniform(0.0, 0.05))
                break  # "mid_save": the write announced on this line is in flight
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()  # SIGKILL cannot be caught: it ends


@pytest.mark.slow
def test_sigkill_never_leaves_a_restorable_but_inconsistent_checkpoint(tmp_path):
    rng = random.Random(0)
    moments = ["at_start", "mid_save", "after_delay"] * (KILLS // 3)
    reference = reference_states(until=8)
    resumed_from, partial_seen, partial_before = [], 0, set()
    for moment in moments:
        proc = start_worker(tmp_path)
        try:
            kill_at(proc, moment, rng)
            assert proc.returncode == -signal.SIGKILL, proc.stderr.read()
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            proc.stdout.close()
            proc.stderr.close()
        partial = {p.name for p in tmp_path.iterdir() if ".orbax-checkpoint-tmp" in p.name}
        partial_seen += bool(partial - partial_before)
        partial_before |= partial
        mgr = crash_worker.manager(tmp_path)
        state = crash_worker.restore_latest(mgr)
        mgr.close()
        if state is None:
            continue
        step = int(state.step)
        resumed_from.append(step)
        if len(reference) <= step + 1:
            reference += reference_states(until=step + 1)[len(reference) :]
        assert int(state.ema_state.step) == step
        assert_same_state(state, reference[step])
        # Training goes on from it exactly as the uninterrupted run did.
        assert_same_state(crash_worker.train_step(state), reference[step + 1])
    print(
        f"\n{len(moments)} kills; restored steps {resumed_from}; "
        f"{partial_seen} kills left a partially written checkpoint behind"
    )
    assert len(resumed_from) >= len(moments) - 1  # only a kill before any save finds none
    assert resumed_from == sorted(resumed_from)  # progress is never lost

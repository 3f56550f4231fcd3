"""Side-by-side timing: candidates measured in interleaved rounds, medians of samples.

On a shared machine the memory bandwidth drifts by tens of percent within a minute,
so a ratio is only trustworthy when its two sides are measured close together: each
round times every candidate once (in a rotated order), and ratios are taken round
by round ("paired") before the median.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax


@dataclasses.dataclass
class Candidate:
    """One thing to time: ``state = step(state)`` called ``calls`` times per sample.

    ``step`` may donate ``state``; the returned state is what the next call gets.
    ``nbytes`` is the memory traffic of one call (for GB/s), 0 when not meaningful.
    """

    name: str
    step: Callable[[Any], Any]
    state: Any
    calls: int = 1
    nbytes: int = 0
    samples: list[float] = dataclasses.field(default_factory=list)  # ms per call

    def run(self, calls: int) -> float:
        """Runs ``calls`` calls back to back, then waits for the result: ms per call."""
        state = self.state
        start = time.perf_counter()
        for _ in range(calls):
            state = self.step(state)
        jax.block_until_ready(state)
        elapsed = time.perf_counter() - start
        self.state = state
        return elapsed / calls * 1e3


def measure(candidates: list[Candidate], rounds: int, warmup: int = 2) -> None:
    """Fills every candidate's ``samples``: ``rounds`` interleaved rounds, order rotated."""
    for c in candidates:
        c.run(warmup)  # compiles, faults pages in, settles the allocator
    for r in range(rounds):
        shift = r % len(candidates)
        for c in candidates[shift:] + candidates[:shift]:
            c.samples.append(c.run(c.calls))


def summary(c: Candidate) -> dict[str, Any]:
    """Median, min, max (ms per call), GB/s at the median, and the raw samples."""
    med = statistics.median(c.samples)
    out: dict[str, Any] = {
        "median_ms": med,
        "min_ms": min(c.samples),
        "max_ms": max(c.samples),
        "calls_per_sample": c.calls,
        "samples_ms": c.samples,
    }
    if c.nbytes:
        out["bytes_per_call"] = c.nbytes
        out["gb_per_s"] = c.nbytes / med / 1e6
    return out


def paired_ratio(a: Candidate, b: Candidate) -> float:
    """Median over rounds of a's time / b's time in the same round."""
    return statistics.median(x / y for x, y in zip(a.samples, b.samples, strict=True))


def paired_ratio_quartiles(a: Candidate, b: Candidate) -> tuple[float, float]:
    """First and third quartile over rounds of a / b: the noise of ``paired_ratio``."""
    q = statistics.quantiles((x / y for x, y in zip(a.samples, b.samples, strict=True)), n=4)
    return q[0], q[2]


def paired_diff(a: Candidate, b: Candidate) -> float:
    """Median over rounds of a's time - b's time in the same round (ms)."""
    return statistics.median(x - y for x, y in zip(a.samples, b.samples, strict=True))


def paired_diff_quartiles(a: Candidate, b: Candidate) -> tuple[float, float]:
    """First and third quartile over rounds of a's time - b's time (ms)."""
    q = statistics.quantiles((x - y for x, y in zip(a.samples, b.samples, strict=True)), n=4)
    return q[0], q[2]


def machine_name() -> str:
    model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1]
                break
    except OSError:
        pass
    slug = re.sub(r"[^a-z0-9]+", "-", model.lower()).strip("-")
    return f"cpu-{os.cpu_count()}core-{slug}"


def write_results(result: dict[str, Any], stem: str, out: str | None) -> Path:
    """The run's JSON at ``out``, or ``results/<stem>-<machine>.json`` beside the benchmarks."""
    path = Path(out or Path(__file__).parent / "results" / f"{stem}-{machine_name()}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, default=float) + "\n")
    print(f"\nwrote {path}")
    return path

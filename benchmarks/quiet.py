"""Is the machine quiet? A benchmark on a shared 2-core machine measures whatever else runs, so each
run records the load average before and after it and the CPU time that processes outside this
benchmark used while it ran (the "foreign" CPU share), and the invocation waits for a quiet machine
before it starts.

The 1-minute load average after a run includes the run's own server and client threads, so it says
little about other jobs; the foreign CPU share does: it counts only processes that are neither this
benchmark's driver nor any of its descendants (the servers it started).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import psutil

log = logging.getLogger(__name__)


def load1() -> float:
    return os.getloadavg()[0]


def wait_for_quiet(max_load: float, timeout_s: float, poll_s: float = 10.0) -> tuple[float, float]:
    """Wait until the 1-minute load average is at most ``max_load`` (or ``timeout_s`` passed).
    Returns (load average when done, seconds waited)."""
    t0 = time.monotonic()
    load = load1()
    while load > max_load and time.monotonic() - t0 < timeout_s:
        log.info("waiting for a quiet machine: load average %.2f > %.2f", load, max_load)
        time.sleep(poll_s)
        load = load1()
    return load, time.monotonic() - t0


def _own_pids() -> set[int]:
    me = psutil.Process()
    try:
        return {me.pid, *(p.pid for p in me.children(recursive=True))}
    except psutil.NoSuchProcess:
        return {me.pid}


def _cpu_seconds(exclude: set[int]) -> dict[int, float]:
    out: dict[int, float] = {}
    for p in psutil.process_iter(["pid", "cpu_times"]):
        if p.info["pid"] in exclude or p.info["cpu_times"] is None:
            continue
        t = p.info["cpu_times"]
        out[p.info["pid"]] = t.user + t.system
    return out


@dataclass
class Quietness:
    """What else the machine did during one run."""

    load_before: float
    load_after: float
    foreign_cpu_s: float  # CPU seconds used by processes outside this benchmark
    foreign_share: float  # foreign_cpu_s / (wall seconds x cores)


class ForeignCpuMeter:
    """Measure the CPU time other processes use between ``start()`` and ``stop()``."""

    def __init__(self) -> None:
        self._t0 = 0.0
        self._load0 = 0.0
        self._before: dict[int, float] = {}

    def start(self) -> None:
        self._load0 = load1()
        self._before = _cpu_seconds(_own_pids())
        self._t0 = time.monotonic()

    def stop(self) -> Quietness:
        wall = max(time.monotonic() - self._t0, 1e-6)
        after = _cpu_seconds(_own_pids())
        # Processes that started during the run count in full; ones that ended are not seen.
        foreign = sum(max(t - self._before.get(pid, 0.0), 0.0) for pid, t in after.items())
        cores = os.cpu_count() or 1
        return Quietness(
            load_before=self._load0,
            load_after=load1(),
            foreign_cpu_s=foreign,
            foreign_share=foreign / (wall * cores),
        )

"""The serving benchmark: every scenario (benchmarks/scenarios.py) side by side in one
invocation, so ratios are fair on a noisy shared machine.

Engines of the reference and the shared base stay up together and their loads are interleaved
(the reference runs beside every shared-base run), so drift shows. With several LoRA-ops variants
of our server, the merged engines run between the first and the second (they need the memory)."""

from __future__ import annotations

import datetime as dt
import importlib.util
import logging
import os
import signal
import time
from typing import Any

from benchmarks.adapters_fixture import dir_bytes, make_adapters, make_merged_models
from benchmarks.analysis import analyse
from benchmarks.config import BenchConfig
from benchmarks.harness import Harness
from benchmarks.records import BenchResults
from benchmarks.scenarios import Monolithic, PeftPeer, Reference, SharedBase

log = logging.getLogger(__name__)


def plugin_installed() -> bool:
    """Whether the CPU LoRA-ops plugin (serving/cpu_lora) is in this checkout."""
    try:
        return importlib.util.find_spec("serving.cpu_lora") is not None
    except ModuleNotFoundError:
        return False


def run_benchmark(cfg: BenchConfig) -> BenchResults:
    """Run every scenario; on an error or SIGTERM/Ctrl-C, stop every server and return what was
    measured (the error is in ``errors``)."""
    h = Harness(cfg)
    t0 = time.perf_counter()

    def on_term(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        _run_scenarios(h)
    except Exception as exc:  # noqa: BLE001 - the report says what failed
        log.exception("benchmark failed")
        h.results.errors.append(f"{type(exc).__name__}: {exc}")
    except KeyboardInterrupt as exc:
        log.warning("interrupted: writing a partial report")
        h.results.errors.append(f"interrupted ({exc})")
    finally:
        h.stop_all()
        signal.signal(signal.SIGTERM, previous)
    results = h.results
    results.finished_utc = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    results.wall_s = time.perf_counter() - t0
    results.machine.load_average_end = list(os.getloadavg())
    results.analysis = analyse(results)
    return results


def _run_scenarios(h: Harness) -> None:
    c = h.cfg
    n_max = max(c.adapter_counts)
    log.info("fixtures: %d adapters, %d merged models in %s", n_max, c.merged_count, c.work_dir)
    adapters = make_adapters(c.base_model, c.work_dir, max(n_max, c.peft_adapters))
    merged = make_merged_models(c.base_model, c.work_dir, adapters, c.merged_count)
    names = list(adapters)
    h.results.memory.adapter_file_bytes = dir_bytes(adapters[names[0]])
    h.results.memory.merged_file_bytes = dir_bytes(merged[names[0]])
    served = {n: adapters[n] for n in names[:n_max]}
    monolithic = Monolithic(h, merged)

    ref = Reference(h)
    ref.start()
    t_start = time.perf_counter()
    for index, variant in enumerate(c.lora_ops_variants):
        if index == 1:
            # The merged engines need the memory, so they run between the variants.
            ref.stop()
            monolithic.run()
            if c.time_budget and time.perf_counter() - t_start > c.time_budget:
                h.note(
                    f"variants {c.lora_ops_variants[1:]} skipped: the time budget "
                    f"({c.time_budget:.0f} s) was spent"
                )
                return
            ref.start(record=False)
        shared = SharedBase(h, variant, served)
        try:
            server = shared.start()
        except Exception as exc:  # noqa: BLE001 - one variant failing leaves the others
            log.exception("shared-base variant %s did not start", variant)
            h.results.errors.append(f"variant {variant}: {type(exc).__name__}: {exc}")
            continue
        if h.results.hot_swap.server is None:  # the first variant that came up
            shared.adapter_costs()
        if index == 0:
            shared.base_only()
        shared.adapter_sweep(ref)
        if index == 0:
            shared.latency_vs_load(ref)
            PeftPeer(h, {n: adapters[n] for n in names[: c.peft_adapters]}).run(server)
        shared.stop()
    ref.stop()
    if len(c.lora_ops_variants) == 1:
        monolithic.run()

"""The serving benchmark: every scenario (benchmarks/scenarios.py) side by side in one
invocation, so ratios are fair: our server and `vllm serve` stay up together and each load runs on
one right after the other; the PEFT peer is paired with a run of ours right after it.

It waits for a quiet machine before it starts, and every run records the load average and the CPU
time other processes used during it (benchmarks.quiet); runs that were not quiet are flagged."""

from __future__ import annotations

import datetime as dt
import importlib.util
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

from benchmarks import roofline
from benchmarks.adapters_fixture import dir_bytes, make_adapters, make_merged_models
from benchmarks.analysis import analyse
from benchmarks.config import BenchConfig
from benchmarks.harness import Harness
from benchmarks.quiet import wait_for_quiet
from benchmarks.records import BenchResults
from benchmarks.scenarios import LlamaCppPeer, Monolithic, PeftPeer, SharedBase, VllmServePeer

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
    load, waited = wait_for_quiet(c.max_load, c.quiet_wait_s)
    h.results.machine.load_average_start = list(os.getloadavg())
    h.results.machine.quiet_wait_s = waited
    if load > c.max_load:
        h.note(f"the machine was not quiet at the start (load average {load:.2f} > {c.max_load})")
    n_max = max(c.adapter_counts)
    log.info("fixtures: %d adapters, %d merged models in %s", n_max, c.merged_count, c.work_dir)
    adapters = make_adapters(c.base_model, c.work_dir, max(n_max, c.peft_adapters))
    merged = make_merged_models(c.base_model, c.work_dir, adapters, c.merged_count)
    names = list(adapters)
    h.results.memory.adapter_file_bytes = dir_bytes(adapters[names[0]])
    h.results.memory.merged_file_bytes = dir_bytes(merged[names[0]])
    served = {n: adapters[n] for n in names[:n_max]}
    if not c.quick:
        h.results.roofline = roofline.measure(Path(c.base_model), _roofline_dtypes())
    for index, variant in enumerate(c.lora_ops_variants):
        shared = SharedBase(h, variant, served)
        try:
            server = shared.start()
        except Exception as exc:  # noqa: BLE001 - one variant failing leaves the others
            log.exception("shared-base variant %s did not start", variant)
            h.results.errors.append(f"variant {variant}: {type(exc).__name__}: {exc}")
            continue
        if h.results.hot_swap.server is None:  # the first variant that came up
            shared.adapter_costs()
        first = index == 0
        vllm_peer = VllmServePeer(h, served) if first and "vllm" in c.peers else None
        peers = [vllm_peer.start()] if vllm_peer else []
        shared.sweep(peers)
        if first:
            shared.single_request([server, *peers])
            shared.latency_vs_load()
        if vllm_peer:
            vllm_peer.stop()
        if first and "peft" in c.peers:
            PeftPeer(h, {n: adapters[n] for n in names[: c.peft_adapters]}).run(server)
        shared.stop()
    if "llamacpp" in c.peers:
        LlamaCppPeer(h, _gguf_files(h)).run()
    Monolithic(h, merged).run()
    # The 1-minute load average after the last server stopped, once it had a minute to settle.
    wait_for_quiet(c.max_load, min(c.quiet_wait_s, 90.0))


def _roofline_dtypes() -> list[str]:
    from benchmarks.servers import bench_dtype

    dtype = bench_dtype()
    return ["float32"] if dtype == "float32" else ["float32", dtype]


def _gguf_files(h: Harness) -> dict[str, Path]:
    """The GGUF files llama.cpp serves: the one the project ships (Q4_1, the embedded base's
    source) and an f16 conversion of the prepared base model (training.gguf_export)."""
    from serving.base_model import embedded_gguf_path

    files: dict[str, Path] = {}
    try:
        files["Q4_1"] = embedded_gguf_path()
    except Exception as exc:  # noqa: BLE001 - the report says what is missing
        h.note(f"shipped GGUF not found: {exc}")
    try:
        from training.gguf_export import write_gguf

        out = h.cfg.work_dir / "gguf" / "base-f16.gguf"
        if not out.exists():
            out.parent.mkdir(parents=True, exist_ok=True)
            write_gguf(Path(h.cfg.base_model), out, "f16")
        files["f16"] = out
    except Exception as exc:  # noqa: BLE001
        h.note(f"no f16 GGUF for llama.cpp: {type(exc).__name__}: {exc}")
    return files

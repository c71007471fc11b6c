"""The serving benchmark's scenarios, one object each, sharing one `Harness` (servers, loads,
results):

1. `Reference`: the base model alone on a plain vLLM engine (no LoRA);
2. `SharedBase`: our server (or vLLM's, ``--server vllm``), one base + N adapters on one engine,
   Zipf traffic, each run paired with a reference run right before it; on the first variant also
   the hot-swap cost, memory per adapter and latency against Poisson load;
3. `Monolithic`: one merged model per tenant, each in its own vLLM engine process; memory of each
   measured, cold start of one on demand;
4. `PeftPeer`: the transformers + PEFT server (``benchmarks.peft_server``), one request at a
   time, beside a shared-base run with the same adapters.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
from pathlib import Path

import psutil

from benchmarks.harness import Harness
from benchmarks.load import LengthDist, LoadConfig, Target, plan, run_load
from benchmarks.records import (
    HotSwapTrial,
    MonolithicMemory,
    PerTenant,
    SharedMemory,
    TouchAll,
)
from benchmarks.servers import Server, peft_server, scrape_metrics, tenantlora_server, vllm_server

log = logging.getLogger(__name__)


def adapter_targets(server: Server, names: list[str]) -> list[Target]:
    """One target per adapter, each adapter its own tenant."""
    return [Target(a, server.base_url, f"tenant-{a}") for a in names]


def plain_engine(h: Harness, name: str, model: str) -> Server:
    """vLLM's own server for ``model`` without LoRA, with the benchmark's engine settings."""
    c = h.cfg
    return vllm_server(
        name,
        model,
        {},
        h.log_dir,
        1,
        1,
        c.max_model_len,
        c.kv_cache_gib,
        enforce_eager=c.enforce_eager,
    )


class Reference:
    """Scenario 1: the base model alone on a plain vLLM engine."""

    def __init__(self, h: Harness):
        self.h = h
        self.server: Server | None = None

    def start(self, record: bool = True) -> Server:
        self.server = self.h.start(plain_engine(self.h, "base-ref", self.h.cfg.base_model))
        first = self.h.first_request(self.server, self.server.base_model_name)
        if record:
            memory = self.server.memory()
            self.h.record_engine(self.server, "reference", first_request=first, memory=memory)
            self.h.results.memory.reference = memory
        return self.server

    def targets(self) -> list[Target]:
        assert self.server is not None
        return [Target(self.server.base_model_name, self.server.base_url, "base")]

    def stop(self) -> None:
        if self.server is not None:
            self.h.stop(self.server)
            self.server = None


class SharedBase:
    """Scenario 2: one base + N adapters on one engine (one LoRA-ops variant of our server)."""

    def __init__(self, h: Harness, variant: bool | None, adapters: dict[str, Path]):
        self.h = h
        self.variant = variant
        self.adapters = adapters
        self.names = list(adapters)
        self.server: Server | None = None

    def start(self) -> Server:
        c = self.h.cfg
        label = {None: "", True: "-ops-on", False: "-ops-off"}[self.variant]
        name = f"{c.server}{label}"
        if c.server == "tenantlora":
            spec = tenantlora_server(
                name,
                c.base_model,
                self.adapters,
                self.h.log_dir,
                c.work_dir / "data" / name,
                c.max_loras,
                len(self.names),
                c.max_model_len,
                c.kv_cache_gib,
                cpu_lora_ops=self.variant,
                enforce_eager=c.enforce_eager,
            )
        else:
            spec = vllm_server(
                name,
                c.base_model,
                self.adapters,
                self.h.log_dir,
                c.max_loras,
                len(self.names),
                c.max_model_len,
                c.kv_cache_gib,
                enforce_eager=c.enforce_eager,
            )
        server = self.server = self.h.start(spec)
        first = self.h.first_request(server, server.base_model_name)
        self.h.record_engine(
            server,
            "shared-base",
            cpu_lora_ops=self.variant,
            first_request=first,
            memory=server.memory(),
        )
        return server

    def stop(self) -> None:
        assert self.server is not None
        self.h.results.engines[self.server.name].memory_end = self.server.memory()
        self.h.stop(self.server)

    def base_only(self) -> None:
        """The shared engine serving the base model alone (no adapter in the batch)."""
        assert self.server is not None
        s = self.server
        self.h.load(
            f"{s.name} base-only",
            [Target(s.base_model_name, s.base_url, "base")],
            scenario="shared-base-no-adapter",
            server=s,
            adapters=0,
        )

    def adapter_sweep(self, ref: Reference) -> None:
        """Throughput against the number of adapters. Each group runs the reference right before
        the shared-base run, so every ratio has a base run beside it (drift)."""
        assert self.server is not None and ref.server is not None
        for n in self.h.cfg.adapter_counts:
            group = f"{self.server.name}:{n}"
            self.h.load(
                f"base-ref (beside {self.server.name} N={n})",
                ref.targets(),
                scenario="base",
                server=ref.server,
                adapters=0,
                group=group,
            )
            self.h.load(
                f"{self.server.name} N={n}",
                adapter_targets(self.server, self.names[:n]),
                scenario="shared",
                server=self.server,
                adapters=n,
                seed=n,
                group=group,
            )

    def adapter_costs(self) -> None:
        """Warm the runtime on the base model at the benchmark's concurrency, measure memory with
        no adapter loaded, load a few adapters one by one (hot swap), then all of them."""
        assert self.server is not None
        s, c = self.server, self.h.cfg
        self.h.load(
            "warmup-base",
            [Target(s.base_model_name, s.base_url)],
            scenario="warmup",
            server=s,
            adapters=0,
            requests=c.concurrency,
        )
        mem0 = s.memory()
        self.hot_swap(self.names[::-1][: c.hot_swap_trials])
        self.touch_all()
        mem1 = s.memory()
        n = len(self.names)
        self.h.results.memory.shared = SharedMemory(
            server=s.name,
            before_adapters=mem0,
            after_adapters=mem1,
            adapters_loaded=n,
            per_adapter_bytes=PerTenant(
                rss=(mem1.rss - mem0.rss) / n, uss=(mem1.uss - mem0.uss) / n
            ),
        )
        metrics = scrape_metrics(s.root_url)
        if metrics.get("tenantlora_adapter_load_seconds_count"):
            self.h.results.hot_swap.server_adapter_load_s_mean = (
                metrics["tenantlora_adapter_load_seconds_sum"]
                / metrics["tenantlora_adapter_load_seconds_count"]
            )

    def hot_swap(self, adapter_names: list[str]) -> None:
        """First request to a cold adapter vs the same request once it is warm."""
        assert self.server is not None
        trials = []
        for name in adapter_names:
            cold = self.h.first_request(self.server, name)
            warm = self.h.first_request(self.server, name)
            trials.append(HotSwapTrial(name, cold, warm))
            log.info(
                "hot swap %s: cold ttft %.3fs, warm ttft %.3fs", name, cold.ttft_s, warm.ttft_s
            )
        hs = self.h.results.hot_swap
        hs.server = self.server.name
        hs.trials = trials
        hs.base_warm = self.h.first_request(self.server, self.server.base_model_name)
        hs.cold_ttft_s_median = statistics.median(t.cold.ttft_s for t in trials)
        hs.warm_ttft_s_median = statistics.median(t.warm.ttft_s for t in trials)
        hs.cold_e2e_s_median = statistics.median(t.cold.e2e_s for t in trials)
        hs.warm_e2e_s_median = statistics.median(t.warm.e2e_s for t in trials)

    def touch_all(self) -> None:
        """Make the engine load every adapter (1-token requests), so memory covers them all."""
        assert self.server is not None
        c = self.h.cfg
        targets = adapter_targets(self.server, self.names)
        cfg = LoadConfig(
            targets=targets,
            zipf=0.0,
            concurrency=4,
            requests=len(targets),
            duration=c.request_timeout * 2,
            prompt_len=LengthDist("fixed", 8),
            max_tokens=LengthDist("fixed", 1),
            request_timeout=c.request_timeout,
        )
        # Every adapter exactly once, instead of random draws.
        schedule = plan(cfg)
        for item, target in zip(schedule, targets, strict=True):
            item.target = target
        t0 = time.perf_counter()
        s = asyncio.run(run_load(cfg, progress=False, schedule=schedule)).summary
        wall = time.perf_counter() - t0
        self.h.results.hot_swap.touch_all = TouchAll(len(targets), s.completed, s.errors, wall)
        log.info("touched %d adapters in %.1fs", s.completed, wall)

    def latency_vs_load(self, ref: Reference) -> None:
        """Poisson arrivals at each rate: reference vs shared base at the 32-adapter mix."""
        assert self.server is not None and ref.server is not None
        c = self.h.cfg
        n_rate = max(n for n in c.adapter_counts if n <= 32)
        for rate in c.rates:
            self.h.load(
                f"base-ref rate={rate}",
                ref.targets(),
                scenario="base-rate",
                server=ref.server,
                adapters=0,
                rate=rate,
                requests=c.rate_requests,
            )
            self.h.load(
                f"{self.server.name} N={n_rate} rate={rate}",
                adapter_targets(self.server, self.names[:n_rate]),
                scenario="shared-rate",
                server=self.server,
                adapters=n_rate,
                rate=rate,
                requests=c.rate_requests,
            )


class PeftPeer:
    """Scenario 4: the transformers + PEFT peer, then the shared base with the same adapters,
    requests and concurrency right after it (a paired run)."""

    def __init__(self, h: Harness, adapters: dict[str, Path]):
        self.h = h
        self.adapters = adapters

    def run(self, shared: Server) -> None:
        c = self.h.cfg
        names = list(self.adapters)
        peer = self.h.start(
            peft_server("peft-peer", c.base_model, self.adapters, self.h.log_dir, c.peft_threads)
        )
        record = self.h.record_engine(peer, "peft-peer", threads=c.peft_threads)
        self.h.first_request(peer, names[0])
        record.memory = peer.memory()
        for server, scenario in ((peer, "peft"), (shared, "shared-vs-peft")):
            self.h.load(
                f"{server.name} N={len(names)} (peer comparison)",
                adapter_targets(server, names),
                scenario=scenario,
                server=server,
                adapters=len(names),
                requests=c.peft_requests,
                seed=len(names),
                group="peft",
            )
        self.h.stop(peer)


class Monolithic:
    """Scenario 3: one merged model per tenant, each in its own vLLM engine process."""

    def __init__(self, h: Harness, merged: dict[str, Path]):
        self.h = h
        self.merged = merged

    def run(self) -> None:
        engines: list[tuple[str, Server]] = []
        for tenant, path in self.merged.items():
            server = self.h.start(plain_engine(self.h, f"merged-{tenant}", str(path)))
            first = self.h.first_request(server, server.base_model_name)
            cold_s = (server.ready_s or 0.0) + first.ttft_s
            memory = server.memory()
            self.h.results.hot_swap.merged_cold_start_s.append(cold_s)
            self.h.record_engine(
                server,
                "monolithic",
                tenant=tenant,
                first_request=first,
                cold_start_s=cold_s,
                memory=memory,
            )
            engines.append((tenant, server))
            log.info(
                "merged %s: cold start to first token %.1fs, USS %.0f MB",
                tenant,
                cold_s,
                memory.uss / 2**20,
            )
        self.h.results.memory.monolithic = MonolithicMemory(
            engines=len(engines),
            per_engine=[s.memory() for _, s in engines],
            available_bytes=psutil.virtual_memory().available,
        )
        self.h.load(
            f"monolithic x{len(engines)}",
            [Target(s.base_model_name, s.base_url, f"tenant-{t}") for t, s in engines],
            scenario="monolithic",
            server=None,
            adapters=len(engines),
            seed=len(engines),
        )
        for _, server in engines:
            self.h.stop(server)

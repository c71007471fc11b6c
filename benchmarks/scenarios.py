"""The serving benchmark's scenarios, one object each, sharing one `Harness` (servers, loads,
results):

1. `SharedBase`: our server (or vLLM's, ``--server vllm``), one base + N adapters on one engine,
   Zipf traffic: base only and each N, with every peer run right after it on the same load; the
   hot-swap cost, memory per adapter, one request alone, optionally latency against Poisson load;
2. `VllmServePeer`: `vllm serve --enable-lora` with the same adapters and engine settings;
3. `PeftPeer`: the transformers + PEFT server (``benchmarks.peft_server``) at the same
   concurrency, paired with a run of ours with the same adapters and requests right after it;
4. `LlamaCppPeer`: llama.cpp's server on GGUF files of the base model (base only);
5. `Monolithic`: one merged model per tenant, each in its own vLLM engine process; memory of each
   measured, cold start of one on demand.
"""

from __future__ import annotations

import asyncio
import logging
import os
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
from benchmarks.servers import (
    Server,
    find_llama_cpp_python,
    llamacpp_server,
    peft_server,
    scrape_metrics,
    tenantlora_server,
    vllm_server,
)

log = logging.getLogger(__name__)

# Every load on one server draws its own prompts (the seed picks them): a repeated prompt would hit
# vLLM's prefix cache and skip its prefill. The sweep's seeds are sweep_seed's (all >= 10000).
SEED_WARMUP, SEED_SINGLE, SEED_RATE, SEED_PEFT = 9001, 9002, 9100, 9200


def sweep_seed(round_index: int, adapters: int, paired_base: bool = False) -> int:
    """The seed of one sweep run: distinct for every round, adapter count and paired base run,
    the same for our server and each peer in one round and N (so they get the same prompts).

    Why: a run that reuses an earlier run's prompts can find them in the server's prefix cache
    and skip most of its prefill (the paired base-only runs once all used seed 0; how much that
    moved their figures was not measured)."""
    if round_index < 0 or not 0 <= adapters < 5000:
        raise ValueError("sweep_seed: round >= 0 and 0 <= adapters < 5000")
    return 10_000 * (round_index + 1) + 2 * adapters + int(paired_base)


def adapter_targets(server: Server, names: list[str]) -> list[Target]:
    """One target per adapter, each adapter its own tenant."""
    return [Target(a, server.base_url, f"tenant-{a}") for a in names]


def vllm_lora_server(h: Harness, name: str, adapters: dict[str, Path]) -> Server:
    """`vllm serve --enable-lora` with every adapter as a --lora-modules entry and the
    benchmark's engine settings (the same as ours)."""
    c = h.cfg
    return vllm_server(
        name,
        c.base_model,
        adapters,
        h.log_dir,
        c.engine_max_loras(),
        len(adapters),
        c.max_model_len,
        c.kv_cache_gib,
        enforce_eager=c.enforce_eager,
        lora_dtype=c.engine_lora_dtype(),
    )


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


class SharedBase:
    """Scenario 1: one base + N adapters on one engine (one LoRA-ops variant of our server)."""

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
                c.engine_max_loras(),
                len(self.names),
                c.max_model_len,
                c.kv_cache_gib,
                cpu_lora_ops=self.variant,
                enforce_eager=c.enforce_eager,
                lora_dtype=c.engine_lora_dtype(),
            )
        else:
            spec = vllm_lora_server(self.h, name, self.adapters)
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

    def sweep(self, peers: list[Server]) -> None:
        """Base only, then each adapter count N: our server, then every peer with the same
        adapters, Zipf draw (seed) and load, one right after the other (side by side); the whole
        sweep ``rounds`` times, so that every figure is a median of runs spread over the run."""
        assert self.server is not None
        rounds = self.h.cfg.rounds
        for r in range(rounds):
            suffix = f" r{r + 1}" if rounds > 1 else ""
            for n in [0, *self.h.cfg.adapter_counts]:
                for server in [self.server, *peers]:
                    ours = server is self.server
                    base = [Target(server.base_model_name, server.base_url, "base")]
                    targets = adapter_targets(server, self.names[:n]) if n else base
                    if ours and n:
                        # Our base alone again right before our N-adapter run: the ratio's two
                        # figures a minute apart (this VM's speed drifts by up to a third
                        # over one benchmark run; see analysis.paired_adapter_runs).
                        self.h.load(
                            f"{server.name} base-only before N={n}{suffix}",
                            base,
                            scenario="shared-base-paired",
                            server=server,
                            adapters=0,
                            seed=sweep_seed(r, n, paired_base=True),
                            group=f"N={n}",
                        )
                    self.h.load(
                        f"{server.name} " + (f"N={n}" if n else "base-only") + suffix,
                        targets,
                        scenario=("shared" if n else "shared-base-no-adapter") if ours else "peer",
                        server=server,
                        adapters=n,
                        seed=sweep_seed(r, n),
                        group=f"N={n}",
                    )

    def single_request(self, servers: list[Server]) -> None:
        """One request alone (concurrency 1, greedy, ignore_eos) on the base model of each server:
        the per-token time without batching."""
        for server in servers:
            single_request_load(self.h, server)

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
            seed=SEED_WARMUP,
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

    def latency_vs_load(self) -> None:
        """Poisson arrivals at each rate: the base model alone vs the 32-adapter mix, same server."""
        assert self.server is not None
        c, s = self.h.cfg, self.server
        n_rate = max(n for n in c.adapter_counts if n <= 32)
        for i, rate in enumerate(c.rates):
            self.h.load(
                f"{s.name} base-only rate={rate}",
                [Target(s.base_model_name, s.base_url, "base")],
                scenario="base-rate",
                server=s,
                adapters=0,
                rate=rate,
                requests=c.rate_requests,
                seed=SEED_RATE + i,
            )
            self.h.load(
                f"{s.name} N={n_rate} rate={rate}",
                adapter_targets(s, self.names[:n_rate]),
                scenario="shared-rate",
                server=s,
                adapters=n_rate,
                rate=rate,
                requests=c.rate_requests,
                seed=SEED_RATE + 50 + i,
            )


class VllmServePeer:
    """`vllm serve --enable-lora` with every adapter as a --lora-modules entry and the same engine
    settings as ours (max_loras, KV cache, dtype, context), run beside our server."""

    def __init__(self, h: Harness, adapters: dict[str, Path]):
        self.h = h
        self.adapters = adapters
        self.server: Server | None = None

    def start(self) -> Server:
        server = self.server = self.h.start(vllm_lora_server(self.h, "vllm-serve", self.adapters))
        first = self.h.first_request(server, server.base_model_name)
        self.h.record_engine(server, "vllm-peer", first_request=first, memory=server.memory())
        return server

    def stop(self) -> None:
        if self.server is not None:
            self.h.results.engines[self.server.name].memory_end = self.server.memory()
            self.h.stop(self.server)
            self.server = None


class LlamaCppPeer:
    """llama.cpp's server (llama-cpp-python) on GGUF files of the same base model: base only at
    the benchmark's concurrency (it serves one request at a time) and one request alone."""

    def __init__(self, h: Harness, ggufs: dict[str, Path]):
        self.h = h
        self.ggufs = ggufs

    def run(self) -> None:
        c = self.h.cfg
        python = find_llama_cpp_python(c.llama_cpp_python)
        if python is None:
            self.h.note(
                "llama.cpp peer skipped: no Python with llama_cpp.server (pip install "
                "'llama-cpp-python[server]' in a venv, pass --llama-cpp-python)"
            )
            return
        threads = os.cpu_count() or 1
        # llama.cpp has no ignore_eos: a -inf bias on the end tokens makes it write max_tokens too.
        no_eos = {"logit_bias": {str(t): -100.0 for t in _end_token_ids(Path(c.base_model))}}
        for label, path in self.ggufs.items():
            server = self.h.start(
                llamacpp_server(f"llama.cpp-{label}", python, path, self.h.log_dir, threads)
            )
            record = self.h.record_engine(server, "llamacpp-peer", threads=threads)
            record.first_request = self.h.first_request(server, server.base_model_name)
            record.memory = server.memory()
            single_request_load(self.h, server, extra_body=no_eos)
            self.h.load(
                f"{server.name} base-only",
                [Target(server.base_model_name, server.base_url, "base")],
                scenario="llamacpp",
                server=server,
                adapters=0,
                requests=c.llamacpp_requests,
                extra_body=no_eos,
            )
            self.h.stop(server)


def single_request_load(
    h: Harness, server: Server, extra_body: dict[str, object] | None = None
) -> None:
    """One request at a time on the server's base model (greedy, max_tokens written): the
    per-token time without batching."""
    c = h.cfg
    h.load(
        f"{server.name} single request",
        [Target(server.base_model_name, server.base_url, "base")],
        scenario="single",
        server=server,
        adapters=0,
        concurrency=1,
        requests=c.single_requests,
        prompt_len=str(c.single_prompt_words),
        seed=SEED_SINGLE,
        extra_body=extra_body,
    )


def _end_token_ids(model_dir: Path) -> set[int]:
    """The ids generation may stop at: the config's eos ids and the tokenizer's special tokens
    (llama.cpp also ends at <|endoftext|> and the like)."""
    import json

    ids: set[int] = set()
    tokenizer = model_dir / "tokenizer.json"
    if tokenizer.exists():
        added = json.loads(tokenizer.read_text()).get("added_tokens", [])
        ids.update(t["id"] for t in added if t.get("special"))
    for name in ("generation_config.json", "config.json"):
        path = model_dir / name
        if path.exists():
            eos = json.loads(path.read_text()).get("eos_token_id")
            ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return ids


class PeftPeer:
    """Scenario 3: the transformers + PEFT peer, then the shared base with the same adapters,
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
                seed=SEED_PEFT,
                group="peft",
            )
        self.h.stop(peer)


class Monolithic:
    """Scenario 5: one merged model per tenant, each in its own vLLM engine process."""

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

"""The serving benchmark: every scenario side by side in one invocation, so ratios are fair on a
noisy shared machine.

1. base model alone on a plain vLLM engine (no LoRA): the reference;
2. our server, one base + N adapters on one engine (N in ``adapter_counts``), Zipf traffic;
   with and without the CPU LoRA-ops plugin when it is installed;
3. monolithic: one merged model per tenant, each in its own vLLM engine process; memory of each
   measured, the cost of N of them extrapolated (labelled), cold start of one on demand;
4. the transformers + PEFT peer (``benchmarks.peft_server``), one request at a time.

Plus the hot-swap cost (first request to a cold adapter vs a warm one, adapter load time) and
memory per additional tenant for both designs. Engines of scenarios 1 and 2 stay up together and
their loads are interleaved (the reference runs first and last) so drift shows.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import importlib.util
import logging
import os
import platform
import signal
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from benchmarks.adapters_fixture import dir_bytes, make_adapters, make_merged_models
from benchmarks.load import LengthDist, LoadConfig, Target, plan, run_load
from benchmarks.servers import (
    Server,
    gpu_memory,
    peft_server,
    scrape_metrics,
    tenantlora_server,
    vllm_server,
)

log = logging.getLogger(__name__)

# vLLM's per-request time histograms (seconds), used to say where a request's time went.
_VLLM_PHASES = ("queue", "prefill", "decode", "inference", "e2e_request_latency")


@dataclass
class BenchConfig:
    """Sizes of one benchmark invocation (``quick()`` / ``full()`` give the presets)."""

    base_model: str
    work_dir: Path
    out_dir: Path
    server: str = "tenantlora"  # "tenantlora" or "vllm" (vLLM's own server with --lora-modules)
    adapter_counts: list[int] = field(default_factory=lambda: [1, 8, 32, 128])
    zipf: float = 1.1
    concurrency: int = 16
    requests: int = 32
    duration: float = 240.0
    prompt_len: str = "uniform:32:128"
    max_tokens: int = 64
    rates: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    rate_requests: int = 20
    lora_ops_variants: list[bool | None] = field(default_factory=lambda: [None])
    max_loras: int = 16
    kv_cache_gib: float = 0.5  # every engine alike (vLLM kv_cache_memory_bytes)
    max_model_len: int = 1024
    merged_count: int = 3
    peft_adapters: int = 8
    peft_requests: int = 12
    peft_threads: int = 1
    hot_swap_trials: int = 3
    request_timeout: float = 300.0
    only: str | None = None  # "monolithic": just scenario 3 (to complete a run that lost it)
    time_budget: float | None = None  # seconds; later LoRA-ops variants are skipped past it
    enforce_eager: bool = False  # every vLLM engine alike: skips torch.compile at start
    quick: bool = False
    name: str = "serving_benchmark"

    @classmethod
    def quick_preset(cls, **kw: Any) -> BenchConfig:
        preset: dict[str, Any] = dict(
            adapter_counts=[1, 4],
            concurrency=4,
            requests=6,
            duration=90.0,
            prompt_len="32",
            max_tokens=16,
            rates=[2.0],
            rate_requests=6,
            max_loras=4,
            merged_count=1,
            peft_adapters=4,
            peft_requests=3,
            hot_swap_trials=1,
            request_timeout=120.0,
            quick=True,
            enforce_eager=True,
            name="serving_benchmark_quick",
        )
        preset.update(kw)
        return cls(**preset)


def plugin_installed() -> bool:
    """Whether the CPU LoRA-ops plugin (serving/cpu_lora) is in this checkout."""
    try:
        return importlib.util.find_spec("serving.cpu_lora") is not None
    except ModuleNotFoundError:
        return False


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    from serving.hardware import cpu_model_name

    cpu = cpu_model_name()
    versions = {}
    for pkg in ("vllm", "torch", "transformers", "peft"):
        try:
            versions[pkg] = __import__(pkg).__version__
        except Exception:  # noqa: BLE001 - best effort
            versions[pkg] = None
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "memory_bytes": psutil.virtual_memory().total,
        "gpu_memory_used_bytes": gpu_memory(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
        "git_commit": commit,
        "load_average_start": list(os.getloadavg()),
        "note": "shared machine: other jobs ran beside this benchmark; compare ratios within "
        "this run only",
    }


class Bench:
    """One invocation: owns the servers it starts and the results it collects."""

    def __init__(self, cfg: BenchConfig):
        self.cfg = cfg
        self.log_dir = cfg.work_dir / "logs"
        self.servers: list[Server] = []
        self.results: dict[str, Any] = {
            "name": cfg.name,
            "started_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "machine": machine_info(),
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
            "engines": {},
            "loads": [],
            "hot_swap": {},
            "memory": {},
            "errors": [],
            "notes": [],
        }

    # -- helpers -------------------------------------------------------------------------------
    def start(self, server: Server) -> Server:
        self.servers.append(server)
        server.start()
        server.wait_ready()
        return server

    def stop(self, server: Server) -> None:
        server.stop()
        if server in self.servers:
            self.servers.remove(server)

    def stop_all(self) -> None:
        for server in list(self.servers):
            try:
                self.stop(server)
            except Exception:  # noqa: BLE001 - keep stopping the others
                log.exception("stopping %s", server.name)

    def load(
        self,
        label: str,
        targets: list[Target],
        *,
        scenario: str,
        server: Server | None,
        adapters: int,
        concurrency: int | None = None,
        rate: float | None = None,
        requests: int | None = None,
        max_tokens: int | None = None,
        prompt_len: str | None = None,
        seed: int = 0,
        group: int | None = None,
    ) -> dict[str, Any]:
        """Run one bounded load, record it with vLLM's phase times when the server has them."""
        c = self.cfg
        cfg = LoadConfig(
            targets=targets,
            zipf=c.zipf,
            rate=rate,
            concurrency=concurrency
            if concurrency is not None
            else (None if rate else c.concurrency),
            requests=requests or c.requests,
            duration=c.duration,
            prompt_len=LengthDist.parse(prompt_len or c.prompt_len),
            max_tokens=LengthDist.parse(str(max_tokens or c.max_tokens)),
            request_timeout=c.request_timeout,
            seed=seed,
        )
        before = scrape_metrics(server.root_url) if server else {}
        log.info("load %s: %d requests over %d targets", label, cfg.requests, len(targets))
        result = asyncio.run(run_load(cfg, progress=True))
        after = scrape_metrics(server.root_url) if server else {}
        s = result["summary"]
        log.info(
            "load %s: %.1f output tok/s, %.2f req/s, e2e p50 %.0f ms, errors %s",
            label,
            s["output_throughput"],
            s["request_throughput"],
            s["e2e_ms"]["p50"] or -1,
            s["errors"],
        )
        entry = {
            "label": label,
            "scenario": scenario,
            "server": server.name if server else "multiple",
            "adapters": adapters,
            "group": group,
            "mode": "rate" if rate else "concurrency",
            "rate": rate,
            "concurrency": cfg.concurrency,
            "loadavg": list(os.getloadavg()),
            "phases_ms": _phase_means(before, after),
            **result,
        }
        self.results["loads"].append(entry)
        return entry

    def first_request(self, server: Server, model: str) -> dict[str, Any]:
        """One short streamed request (16 tokens) alone on the server."""
        cfg = LoadConfig(
            targets=[Target(model, server.base_url)],
            concurrency=1,
            requests=1,
            duration=self.cfg.request_timeout,
            prompt_len=LengthDist("fixed", 32),
            max_tokens=LengthDist("fixed", 16),
            request_timeout=self.cfg.request_timeout,
        )
        rec = asyncio.run(run_load(cfg, progress=False))["requests"][0]
        if rec["error"]:
            raise RuntimeError(f"request to {model} on {server.name} failed: {rec}")
        return {"ttft_s": rec["ttft"], "e2e_s": rec["e2e"]}

    def engine_record(self, server: Server, role: str, **extra: Any) -> dict[str, Any]:
        rec = {"role": role, "ready_s": server.ready_s, "cmd": " ".join(server.cmd[:6]) + " ..."}
        rec.update(extra)
        self.results["engines"][server.name] = rec
        return rec

    # -- the run -------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        c = self.cfg
        t0 = time.perf_counter()

        def on_term(signum: int, _frame: Any) -> None:
            raise KeyboardInterrupt(f"signal {signum}")

        previous = signal.signal(signal.SIGTERM, on_term)
        try:
            self._run_all()
        except Exception as exc:  # noqa: BLE001 - the report says what failed
            log.exception("benchmark failed")
            self.results["errors"].append(f"{type(exc).__name__}: {exc}")
        except KeyboardInterrupt as exc:
            log.warning("interrupted: writing a partial report")
            self.results["errors"].append(f"interrupted ({exc})")
        finally:
            self.stop_all()
            signal.signal(signal.SIGTERM, previous)
        self.results["finished_utc"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        self.results["wall_s"] = time.perf_counter() - t0
        self.results["machine"]["load_average_end"] = list(os.getloadavg())
        self.results["analysis"] = analyse(self.results, c)
        return self.results

    def _run_all(self) -> None:
        c = self.cfg
        n_max = max(c.adapter_counts)
        log.info("fixtures: %d adapters, %d merged models in %s", n_max, c.merged_count, c.work_dir)
        adapters = make_adapters(c.base_model, c.work_dir, max(n_max, c.peft_adapters))
        merged = make_merged_models(c.base_model, c.work_dir, adapters, c.merged_count)
        names = list(adapters)
        first = names[0]
        self.results["memory"]["adapter_file_bytes"] = dir_bytes(adapters[first])
        self.results["memory"]["merged_file_bytes"] = dir_bytes(merged[first])
        if c.only == "monolithic":
            self.monolithic(merged)
            return

        # 1. the reference: the base model alone on a plain engine.
        ref = self._start_reference()
        self.results["memory"]["reference"] = ref.memory()
        base_targets = [Target(ref.base_model_name, ref.base_url, "base")]

        # 2. our server, one engine per LoRA-ops variant in turn (two engines up at most, so
        # the run fits beside other jobs), all adapters registered. The first variant also gets
        # the hot-swap, memory, latency-vs-load and PEFT-peer measurements.
        t_start = time.perf_counter()
        for index, variant in enumerate(c.lora_ops_variants):
            if index == 1:
                # Memory: the merged engines need the room, so they run between the variants.
                self.stop(ref)
                # 3. monolithic: one merged model per tenant, each in its own engine.
                self.monolithic(merged)
                if c.time_budget and time.perf_counter() - t_start > c.time_budget:
                    note = (
                        f"variants {c.lora_ops_variants[1:]} skipped: the time budget "
                        f"({c.time_budget:.0f} s) was spent"
                    )
                    self.results["notes"].append(note)
                    log.warning(note)
                    return
                ref = self._start_reference(record=False)
                base_targets = [Target(ref.base_model_name, ref.base_url, "base")]
            try:
                server = self.start(self._shared_server(variant, adapters, names[:n_max]))
            except Exception as exc:  # noqa: BLE001 - one variant failing leaves the others
                log.exception("shared-base variant %s did not start", variant)
                self.results["errors"].append(f"variant {variant}: {type(exc).__name__}: {exc}")
                continue
            first_base = self.first_request(server, server.base_model_name)
            self.engine_record(
                server,
                "shared-base",
                cpu_lora_ops=variant,
                first_request=first_base,
                memory=server.memory(),
            )
            if "server" not in self.results["hot_swap"]:
                self.adapter_costs(server, names[:n_max])
            # Throughput against the number of adapters. Each group runs the reference right
            # before the shared-base run, so every ratio has a base run beside it (drift).
            if index == 0:
                self.load(
                    f"{server.name} base-only",
                    [Target(server.base_model_name, server.base_url, "base")],
                    scenario="shared-base-no-adapter",
                    server=server,
                    adapters=0,
                )
            for n in c.adapter_counts:
                group = f"{server.name}:{n}"
                self.load(
                    f"base-ref (beside {server.name} N={n})",
                    base_targets,
                    scenario="base",
                    server=ref,
                    adapters=0,
                    group=group,
                )
                targets = [Target(a, server.base_url, f"tenant-{a}") for a in names[:n]]
                self.load(
                    f"{server.name} N={n}",
                    targets,
                    scenario="shared",
                    server=server,
                    adapters=n,
                    seed=n,
                    group=group,
                )
            if index == 0:
                self.latency_vs_load(ref, server, names)
                # 4. the transformers + PEFT peer, beside a shared-base run with the same mix.
                self.peft_scenario(adapters, names[: c.peft_adapters], server)
            self.results["engines"][server.name]["memory_end"] = server.memory()
            self.stop(server)
        self.stop(ref)
        if len(c.lora_ops_variants) == 1:
            self.monolithic(merged)

    def _start_reference(self, record: bool = True) -> Server:
        """The base model alone on a plain vLLM engine (no LoRA)."""
        c = self.cfg
        ref = self.start(
            vllm_server(
                "base-ref",
                c.base_model,
                {},
                self.log_dir,
                1,
                1,
                c.max_model_len,
                c.kv_cache_gib,
                enforce_eager=c.enforce_eager,
            )
        )
        first = self.first_request(ref, ref.base_model_name)
        if record:
            self.engine_record(ref, "reference", first_request=first, memory=ref.memory())
        return ref

    def _shared_server(self, variant: bool | None, adapters: dict[str, Path], names: list[str]):
        c = self.cfg
        label = {None: "", True: "-ops-on", False: "-ops-off"}[variant]
        name = f"{c.server}{label}"
        loras = {n: adapters[n] for n in names}
        if c.server == "tenantlora":
            return tenantlora_server(
                name,
                c.base_model,
                loras,
                self.log_dir,
                c.work_dir / "data" / name,
                c.max_loras,
                len(names),
                c.max_model_len,
                c.kv_cache_gib,
                cpu_lora_ops=variant,
                enforce_eager=c.enforce_eager,
            )
        return vllm_server(
            name,
            c.base_model,
            loras,
            self.log_dir,
            c.max_loras,
            len(names),
            c.max_model_len,
            c.kv_cache_gib,
            enforce_eager=c.enforce_eager,
        )

    def adapter_costs(self, server: Server, names: list[str]) -> None:
        """Warm the runtime on the base model at the benchmark's concurrency, measure memory with
        no adapter loaded, load a few adapters one by one (hot swap), then all of them."""
        c = self.cfg
        self.load(
            "warmup-base",
            [Target(server.base_model_name, server.base_url)],
            scenario="warmup",
            server=server,
            adapters=0,
            requests=c.concurrency,
        )
        mem0 = server.memory()
        self.hot_swap(server, names[::-1][: c.hot_swap_trials])
        self.touch_all(server, names)
        mem1 = server.memory()
        self.results["memory"]["shared"] = {
            "server": server.name,
            "before_adapters": mem0,
            "after_adapters": mem1,
            "adapters_loaded": len(names),
            "per_adapter_bytes": {k: (mem1[k] - mem0[k]) / len(names) for k in ("rss", "uss")},
        }
        metrics = scrape_metrics(server.root_url)
        if metrics.get("tenantlora_adapter_load_seconds_count"):
            self.results["hot_swap"]["server_adapter_load_s_mean"] = (
                metrics["tenantlora_adapter_load_seconds_sum"]
                / metrics["tenantlora_adapter_load_seconds_count"]
            )

    def latency_vs_load(self, ref: Server, server: Server, names: list[str]) -> None:
        """Poisson arrivals at each rate: reference vs shared base at the 32-adapter mix."""
        c = self.cfg
        n_rate = max(n for n in c.adapter_counts if n <= 32)
        for rate in c.rates:
            self.load(
                f"base-ref rate={rate}",
                [Target(ref.base_model_name, ref.base_url, "base")],
                scenario="base-rate",
                server=ref,
                adapters=0,
                rate=rate,
                requests=c.rate_requests,
            )
            targets = [Target(a, server.base_url, f"tenant-{a}") for a in names[:n_rate]]
            self.load(
                f"{server.name} N={n_rate} rate={rate}",
                targets,
                scenario="shared-rate",
                server=server,
                adapters=n_rate,
                rate=rate,
                requests=c.rate_requests,
            )

    def hot_swap(self, server: Server, adapter_names: list[str]) -> None:
        """First request to a cold adapter vs the same request once it is warm."""
        trials = []
        for name in adapter_names:
            cold = self.first_request(server, name)
            warm = self.first_request(server, name)
            trials.append({"adapter": name, "cold": cold, "warm": warm})
            log.info(
                "hot swap %s: cold ttft %.3fs, warm ttft %.3fs",
                name,
                cold["ttft_s"],
                warm["ttft_s"],
            )
        base = self.first_request(server, server.base_model_name)
        self.results["hot_swap"].update(
            {
                "server": server.name,
                "trials": trials,
                "base_warm": base,
                "cold_ttft_s_median": statistics.median(t["cold"]["ttft_s"] for t in trials),
                "warm_ttft_s_median": statistics.median(t["warm"]["ttft_s"] for t in trials),
                "cold_e2e_s_median": statistics.median(t["cold"]["e2e_s"] for t in trials),
                "warm_e2e_s_median": statistics.median(t["warm"]["e2e_s"] for t in trials),
            }
        )

    def touch_all(self, server: Server, adapter_names: list[str]) -> None:
        """Make the engine load every adapter (1-token requests), so memory covers them all."""
        targets = [Target(a, server.base_url, f"tenant-{a}") for a in adapter_names]
        cfg = LoadConfig(
            targets=targets,
            zipf=0.0,
            concurrency=4,
            requests=len(targets),
            duration=self.cfg.request_timeout * 2,
            prompt_len=LengthDist("fixed", 8),
            max_tokens=LengthDist("fixed", 1),
            request_timeout=self.cfg.request_timeout,
        )
        # Every adapter exactly once, instead of random draws.
        schedule = plan(cfg)
        for item, target in zip(schedule, targets, strict=True):
            item.target = target
        t0 = time.perf_counter()
        result = asyncio.run(run_load(cfg, progress=False, schedule=schedule))
        s = result["summary"]
        self.results["hot_swap"]["touch_all"] = {
            "adapters": len(targets),
            "completed": s["completed"],
            "errors": s["errors"],
            "wall_s": time.perf_counter() - t0,
        }
        log.info("touched %d adapters in %.1fs", s["completed"], time.perf_counter() - t0)

    def peft_scenario(
        self, adapters: dict[str, Any], peer_names: list[str], shared: Server
    ) -> None:
        """The transformers + PEFT peer, then the shared base with the same adapters, requests
        and concurrency right after it (a paired run)."""
        c = self.cfg
        peer = self.start(
            peft_server(
                "peft-peer",
                c.base_model,
                {n: adapters[n] for n in peer_names},
                self.log_dir,
                c.peft_threads,
            )
        )
        self.engine_record(peer, "peft-peer", threads=c.peft_threads)
        self.first_request(peer, peer_names[0])
        self.results["engines"][peer.name]["memory"] = peer.memory()
        n = len(peer_names)
        for server, scenario in ((peer, "peft"), (shared, "shared-vs-peft")):
            targets = [Target(a, server.base_url, f"tenant-{a}") for a in peer_names]
            self.load(
                f"{server.name} N={n} (peer comparison)",
                targets,
                scenario=scenario,
                server=server,
                adapters=n,
                requests=c.peft_requests,
                seed=n,
                group="peft",
            )
        self.stop(peer)

    def monolithic(self, merged: dict[str, Path]) -> None:
        c = self.cfg
        engines: list[tuple[str, Server]] = []
        cold = []
        for tenant, path in merged.items():
            server = self.start(
                vllm_server(
                    f"merged-{tenant}",
                    str(path),
                    {},
                    self.log_dir,
                    1,
                    1,
                    c.max_model_len,
                    c.kv_cache_gib,
                    enforce_eager=c.enforce_eager,
                )
            )
            first = self.first_request(server, server.base_model_name)
            cold_s = server.ready_s + first["ttft_s"]
            mem = server.memory()
            cold.append(cold_s)
            self.engine_record(
                server,
                "monolithic",
                tenant=tenant,
                first_request=first,
                cold_start_s=cold_s,
                memory=mem,
            )
            engines.append((tenant, server))
            log.info(
                "merged %s: cold start to first token %.1fs, USS %.0f MB",
                tenant,
                cold_s,
                mem["uss"] / 2**20,
            )
        self.results["memory"]["monolithic"] = {
            "engines": len(engines),
            "per_engine": [s.memory() for _, s in engines],
            "available_bytes": psutil.virtual_memory().available,
        }
        self.results["hot_swap"]["merged_cold_start_s"] = cold
        targets = [Target(s.base_model_name, s.base_url, f"tenant-{t}") for t, s in engines]
        self.load(
            f"monolithic x{len(engines)}",
            targets,
            scenario="monolithic",
            server=None,
            adapters=len(engines),
            seed=len(engines),
        )
        for _, server in engines:
            self.stop(server)


def _phase_means(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Mean seconds per request in each vLLM phase over one load (from /metrics deltas), in ms."""
    out = {}
    for phase in _VLLM_PHASES:
        key = (
            f"vllm:request_{phase}_time_seconds"
            if phase != "e2e_request_latency"
            else ("vllm:e2e_request_latency_seconds")
        )
        n = after.get(key + "_count", 0.0) - before.get(key + "_count", 0.0)
        if n > 0:
            out[phase] = 1000 * (after.get(key + "_sum", 0.0) - before.get(key + "_sum", 0.0)) / n
    return out


def _find(loads: list[dict[str, Any]], **match: Any) -> list[dict[str, Any]]:
    return [x for x in loads if all(x.get(k) == v for k, v in match.items())]


def analyse(results: dict[str, Any], cfg: BenchConfig) -> dict[str, Any]:
    """Headline ratios against the issue's goals, and the memory extrapolation."""
    loads = results["loads"]
    out: dict[str, Any] = {"goals": {}, "extrapolation": [], "throughput_by_adapters": {}}

    def tput(entry: dict[str, Any]) -> float:
        return entry["summary"]["output_throughput"]

    base_runs = _find(loads, scenario="base")
    base_tput = statistics.mean(tput(x) for x in base_runs) if base_runs else None
    out["base_output_throughput"] = base_tput
    out["base_output_throughput_runs"] = [tput(x) for x in base_runs]
    for entry in _find(loads, scenario="shared"):
        out["throughput_by_adapters"].setdefault(entry["server"], {})[entry["adapters"]] = tput(
            entry
        )
    main = results["hot_swap"].get("server")
    shared = out["throughput_by_adapters"].get(main, {}) if main else {}
    n32 = max((n for n in shared if n <= 32), default=None)
    if base_tput and n32 is not None:
        # Paired: the shared-base run over the reference run of the same group (side by side).
        run = _find(loads, scenario="shared", server=main, adapters=n32)[0]
        paired = _find(loads, scenario="base", group=run.get("group"))
        pair_tput = tput(paired[0]) if paired else base_tput
        ratio = shared[n32] / pair_tput
        out["goals"]["throughput_32_adapters_vs_base"] = {
            "adapters": n32,
            "value": ratio,
            "base_output_throughput_paired": pair_tput,
            "vs_mean_of_base_runs": shared[n32] / base_tput,
            "goal": ">= 0.7",
            "met": ratio >= 0.7,
        }
    out["paired_ratios"] = {}
    for entry in _find(loads, scenario="shared"):
        paired = _find(loads, scenario="base", group=entry.get("group"))
        if paired and tput(paired[0]) > 0:
            out["paired_ratios"].setdefault(entry["server"], {})[entry["adapters"]] = tput(
                entry
            ) / tput(paired[0])
    peft = _find(loads, scenario="peft")
    if peft:
        n_peft = peft[0]["adapters"]
        pair = [x for x in _find(loads, scenario="shared-vs-peft") if x["summary"]["completed"]]
        ours = tput(pair[0]) if pair else shared.get(n_peft)
        if ours is not None and tput(peft[0]) > 0:
            ratio = ours / tput(peft[0])
            out["goals"]["throughput_vs_peft_peer"] = {
                "adapters": n_peft,
                "value": ratio,
                "basis": "paired run right after the peer"
                if pair
                else f"the shared-base N={n_peft} run of the adapter sweep (the paired run failed)",
                "goal": ">= 5",
                "met": ratio >= 5,
            }
    mem = results["memory"]
    mono = mem.get("monolithic", {}).get("per_engine") or []
    per_engine_uss = statistics.mean(m["uss"] for m in mono) if mono else None
    per_engine_rss = statistics.mean(m["rss"] for m in mono) if mono else None
    per_adapter = (mem.get("shared") or {}).get("per_adapter_bytes")
    if per_engine_uss and per_adapter:
        ratio = max(per_adapter["uss"], 0) / per_engine_uss
        out["goals"]["memory_per_tenant_vs_merged"] = {
            "value": ratio,
            "per_adapter_uss_bytes": per_adapter["uss"],
            "per_merged_engine_uss_bytes": per_engine_uss,
            "goal": "<= 0.05",
            "met": ratio <= 0.05,
        }
        shared_base = mem["shared"]["before_adapters"]["uss"]
        measured_n = mem["shared"]["adapters_loaded"]
        for n in sorted({1, 8, 32, 128, *cfg.adapter_counts}):
            out["extrapolation"].append(
                {
                    "tenants": n,
                    "shared_uss_bytes": shared_base + n * per_adapter["uss"],
                    "shared_basis": "measured" if n == measured_n else "interpolated",
                    "monolithic_uss_bytes": n * per_engine_uss,
                    "monolithic_rss_bytes": n * per_engine_rss,
                    "monolithic_basis": "measured" if n <= len(mono) else "extrapolated",
                }
            )
        out["monolithic_engines_that_fit"] = int(
            mem["monolithic"]["available_bytes"] // per_engine_uss
        )
        out["monolithic_engines_that_fit_total_ram"] = int(
            results["machine"]["memory_bytes"] // per_engine_uss
        )
    hs = results["hot_swap"]
    if hs.get("merged_cold_start_s") and hs.get("cold_ttft_s_median") is not None:
        merged_cold = statistics.mean(hs["merged_cold_start_s"])
        ratio = hs["cold_ttft_s_median"] / merged_cold
        out["goals"]["cold_adapter_vs_merged_cold_start"] = {
            "value": ratio,
            "cold_adapter_ttft_s": hs["cold_ttft_s_median"],
            "merged_cold_start_s": merged_cold,
            "goal": "<= 0.05",
            "met": ratio <= 0.05,
        }
    return out

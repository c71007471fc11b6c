"""What every scenario of the serving benchmark shares: the servers it started (stopped at the
end whatever happens), bounded loads recorded with vLLM's phase times, single probe requests,
and the results being collected."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import platform
import subprocess
from dataclasses import asdict

import psutil

from benchmarks.config import BenchConfig
from benchmarks.load import LengthDist, LoadConfig, Target, run_load
from benchmarks.quiet import ForeignCpuMeter
from benchmarks.records import BenchResults, EngineRecord, FirstRequest, LoadRun, MachineInfo
from benchmarks.servers import Server, gpu_memory, scrape_metrics

log = logging.getLogger(__name__)

# A run during which processes outside the benchmark used more than this share of the CPU is
# flagged as not quiet (its figures measure the machine's other work too).
FOREIGN_SHARE_LIMIT = 0.05

# vLLM's per-request time histograms (seconds), used to say where a request's time went.
_VLLM_PHASES = {
    "queue": "vllm:request_queue_time_seconds",
    "prefill": "vllm:request_prefill_time_seconds",
    "decode": "vllm:request_decode_time_seconds",
    "inference": "vllm:request_inference_time_seconds",
    "e2e_request_latency": "vllm:e2e_request_latency_seconds",
}
# vLLM's prefix-cache counters, in prompt tokens.
_PREFIX_QUERIES = "vllm:prefix_cache_queries_total"
_PREFIX_HITS = "vllm:prefix_cache_hits_total"


def machine_info() -> MachineInfo:
    """What the numbers are measured on."""
    from serving.hardware import cpu_model_name

    versions: dict[str, str | None] = {}
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
    return MachineInfo(
        cpu=cpu_model_name(),
        logical_cores=os.cpu_count(),
        memory_bytes=psutil.virtual_memory().total,
        gpu_memory_used_bytes=gpu_memory(),
        platform=platform.platform(),
        python=platform.python_version(),
        versions=versions,
        git_commit=commit,
        load_average_start=list(os.getloadavg()),
    )


def phase_means(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Mean milliseconds per request in each vLLM phase over one load (from /metrics deltas)."""
    out = {}
    for phase, key in _VLLM_PHASES.items():
        n = after.get(key + "_count", 0.0) - before.get(key + "_count", 0.0)
        if n > 0:
            out[phase] = 1000 * (after.get(key + "_sum", 0.0) - before.get(key + "_sum", 0.0)) / n
    return out


def prefix_cache_hit_rate(before: dict[str, float], after: dict[str, float]) -> float | None:
    """Share of the prompt tokens of one load that vLLM's prefix cache already held (from
    /metrics deltas); None when the server reports no prefix-cache queries."""
    queries = after.get(_PREFIX_QUERIES, 0.0) - before.get(_PREFIX_QUERIES, 0.0)
    if queries <= 0:
        return None
    return (after.get(_PREFIX_HITS, 0.0) - before.get(_PREFIX_HITS, 0.0)) / queries


class Harness:
    """Owns the servers one invocation starts and the results it collects."""

    def __init__(self, cfg: BenchConfig):
        self.cfg = cfg
        self.log_dir = cfg.work_dir / "logs"
        self.servers: list[Server] = []
        self.results = BenchResults(
            name=cfg.name,
            started_utc=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            machine=machine_info(),
            config=cfg,
        )

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

    def note(self, text: str) -> None:
        self.results.notes.append(text)
        log.warning(text)

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
        seed: int = 0,
        group: str | None = None,
        prompt_len: str | None = None,
        extra_body: dict[str, object] | None = None,
    ) -> LoadRun:
        """Run one bounded load, record it with vLLM's phase times when the server has them and
        with what else the machine did meanwhile (benchmarks.quiet)."""
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
            max_tokens=LengthDist.parse(str(c.max_tokens)),
            request_timeout=c.request_timeout,
            seed=seed,
            extra_body=dict(extra_body or {}),
        )
        before = scrape_metrics(server.root_url) if server else {}
        log.info("load %s: %d requests over %d targets", label, cfg.requests, len(targets))
        meter = ForeignCpuMeter()
        meter.start()
        result = asyncio.run(run_load(cfg, progress=True))
        quiet = meter.stop()
        after = scrape_metrics(server.root_url) if server else {}
        s = result.summary
        log.info(
            "load %s: %.1f output tok/s, %.2f req/s, e2e p50 %.0f ms, errors %s",
            label,
            s.output_throughput,
            s.request_throughput,
            s.e2e_ms["p50"] or -1,
            s.errors,
        )
        # The load average before a run includes the previous run's own servers, so the flag is
        # the CPU that processes outside this benchmark used during the run.
        noisy = quiet.foreign_share > FOREIGN_SHARE_LIMIT
        if noisy:
            self.note(
                f"run {label!r} not quiet: other processes used "
                f"{100 * quiet.foreign_share:.1f} % of the CPU during it"
            )
        run = LoadRun(
            label=label,
            scenario=scenario,
            server=server.name if server else "multiple",
            adapters=adapters,
            group=group,
            mode="rate" if rate else "concurrency",
            rate=rate,
            concurrency=cfg.concurrency,
            loadavg=list(os.getloadavg()),
            quiet=quiet,
            noisy=noisy,
            phases_ms=phase_means(before, after),
            prefix_cache_hit_rate=prefix_cache_hit_rate(before, after),
            config=result.config,
            summary=s,
            requests=[asdict(r) for r in result.requests],
        )
        self.results.loads.append(run)
        return run

    def first_request(self, server: Server, model: str) -> FirstRequest:
        """One short streamed request (32 words in, 16 tokens out) alone on the server."""
        cfg = LoadConfig(
            targets=[Target(model, server.base_url)],
            concurrency=1,
            requests=1,
            duration=self.cfg.request_timeout,
            prompt_len=LengthDist("fixed", 32),
            max_tokens=LengthDist("fixed", 16),
            request_timeout=self.cfg.request_timeout,
            seed=9003,  # not the sweep's prompts (they would then hit the prefix cache)
        )
        rec = asyncio.run(run_load(cfg, progress=False)).requests[0]
        if rec.error or rec.ttft is None or rec.e2e is None:
            raise RuntimeError(f"request to {model} on {server.name} failed: {rec}")
        return FirstRequest(ttft_s=rec.ttft, e2e_s=rec.e2e)

    def record_engine(self, server: Server, role: str, **extra: object) -> EngineRecord:
        record = EngineRecord(
            role=role, ready_s=server.ready_s, cmd=" ".join(server.cmd[:6]) + " ...", **extra
        )
        self.results.engines[server.name] = record
        return record

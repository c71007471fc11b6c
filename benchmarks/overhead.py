"""The tenant layer's cost: `tenantlora serve` against `vllm serve` on base-model traffic.

Both servers run the same engine with the same settings (LoRA enabled with the same slots,
rank and target modules, the same dtype, KV cache and CPU LoRA-ops plugin); tenantlora adds
what a tenant request goes through (key lookup, model resolution, admission, lease, metrics,
usage ledger, private prefix cache salt). tenantlora runs twice: on its SQLite registry and on a
PostgreSQL one. The loads are interleaved round by round (vLLM, SQLite, PostgreSQL, then again),
and each ratio is the median of its per-round ratios, so drift hits all three alike.

    tenantlora bench overhead                  # writes benchmarks/results/overhead.{json,md,png}
    tenantlora bench overhead --quick          # smoke size
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from adapters.targets import LORA_TARGET_MODULES
from benchmarks.harness import machine_info
from benchmarks.load import LengthDist, LoadConfig, LoadSummary, Target, run_load
from benchmarks.records import Goal, MachineInfo
from benchmarks.servers import Server, bench_dtype, create_tenant_key, free_port

log = logging.getLogger(__name__)
RESULTS_DIR = Path(__file__).resolve().parent / "results"
ADMIN_KEY = "bench-admin-key"
GOAL_RATIO = 0.95  # the tenant layer costs at most 5 % of base-only throughput
BUSY_LOAD = 1.5


@dataclass
class OverheadConfig:
    base_model: str
    work_dir: Path
    out_dir: Path = RESULTS_DIR
    postgres_url: str | None = None
    requests: int = 96
    concurrency: int = 16
    prompt_words: int = 48
    max_tokens: int = 64
    rounds: int = 3
    max_loras: int = 4
    max_cpu_loras: int = 16
    max_model_len: int = 1024
    kv_cache_gib: float = 1.0

    @classmethod
    def quick(cls, **kw: Any) -> OverheadConfig:
        return cls(**{"requests": 16, "concurrency": 4, "max_tokens": 16, "rounds": 1, **kw})


@dataclass
class Round:
    server: str
    round: int
    output_throughput: float
    request_throughput: float
    ttft_ms_mean: float | None
    tpot_ms_mean: float | None
    failed: int
    loadavg_before: list[float]
    loadavg_after: list[float]


@dataclass
class OverheadResults:
    config: dict[str, Any]
    machine: MachineInfo
    rounds: list[Round] = field(default_factory=list)
    analysis: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _engine_flags(cfg: OverheadConfig) -> list[str]:
    """The engine settings both servers share (as `tenantlora serve` spells them)."""
    return [
        "--max-loras", str(cfg.max_loras), "--max-cpu-loras", str(cfg.max_cpu_loras),
        "--max-model-len", str(cfg.max_model_len), "--kv-cache-gib", str(cfg.kv_cache_gib),
        "--dtype", bench_dtype(), "--max-lora-rank", "16",
    ]  # fmt: skip


def vllm_serve(cfg: OverheadConfig, log_dir: Path) -> Server:
    """vLLM's own OpenAI server with LoRA enabled exactly as tenantlora's engine is."""
    port = free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", cfg.base_model]
    cmd += ["--served-model-name", "base", "--port", str(port), "--host", "127.0.0.1"]
    cmd += ["--max-model-len", str(cfg.max_model_len), "--dtype", bench_dtype()]
    cmd += ["--kv-cache-memory-bytes", str(int(cfg.kv_cache_gib * 1024**3))]
    cmd += ["--max-num-seqs", "64", "--enable-lora", "--max-lora-rank", "16"]
    cmd += ["--max-loras", str(cfg.max_loras), "--max-cpu-loras", str(cfg.max_cpu_loras)]
    cmd += ["--lora-target-modules", *LORA_TARGET_MODULES]
    # The same CPU LoRA-ops plugin tenantlora's engine runs (a vLLM plugin, on by this switch).
    env = {"TENANTLORA_CPU_LORA_OPS": "1"}
    return Server("vllm-serve", cmd, port, log_dir / "vllm-serve.log", env, base_model_name="base")


def tenantlora_serve(cfg: OverheadConfig, name: str, log_dir: Path, db_url: str | None) -> Server:
    port = free_port()
    data_dir = cfg.work_dir / name
    cmd = [sys.executable, "-m", "serving.cli", "serve", "--base-model", cfg.base_model]
    cmd += ["--port", str(port), "--data-dir", str(data_dir), "--served-model-name", "base"]
    cmd += ["--max-num-seqs", "64", *_engine_flags(cfg)]
    env = {"TENANTLORA_ADMIN_KEY": ADMIN_KEY, "TENANTLORA_CPU_LORA_OPS": "1"}
    if db_url:
        cmd += ["--database-url", db_url]
    return Server(name, cmd, port, log_dir / f"{name}.log", env, base_model_name="base")


def _load(cfg: OverheadConfig, target: Target) -> LoadSummary:
    config = LoadConfig(
        targets=[target],
        zipf=0.0,
        concurrency=cfg.concurrency,
        requests=cfg.requests,
        duration=900.0,
        prompt_len=LengthDist("fixed", cfg.prompt_words),
        max_tokens=LengthDist("fixed", cfg.max_tokens),
        api="completions",
        request_timeout=600.0,
    )
    return asyncio.run(run_load(config, progress=False)).summary


@contextmanager
def private_postgres() -> Iterator[str]:
    """A private PostgreSQL started by the project's script (as the tests do), then stopped."""
    root = tempfile.mkdtemp(prefix="tenantlora-bench-postgres-")
    env = {**os.environ, "TENANTLORA_PG_ROOT": root, "TENANTLORA_PG_PORT": str(free_port())}
    script = ["bash", str(Path(__file__).resolve().parents[1] / ".ci" / "postgres.sh")]
    out = subprocess.run(script, env=env, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f".ci/postgres.sh failed: {out.stderr[-2000:]}")
    try:
        yield out.stdout.strip().splitlines()[-1]
    finally:
        subprocess.run([*script, "stop"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(root, ignore_errors=True)


def run(cfg: OverheadConfig) -> OverheadResults:
    if cfg.postgres_url:
        return _run(cfg, cfg.postgres_url)
    with private_postgres() as url:
        return _run(cfg, url)


def _run(cfg: OverheadConfig, postgres_url: str) -> OverheadResults:
    cfg.work_dir.mkdir(parents=True, exist_ok=True)
    log_dir = cfg.work_dir / "logs"
    servers = [
        vllm_serve(cfg, log_dir),
        tenantlora_serve(cfg, "tenantlora-sqlite", log_dir, None),
        tenantlora_serve(cfg, "tenantlora-postgresql", log_dir, postgres_url),
    ]
    described = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()}
    described["postgres_url"] = (
        "private server (.ci/postgres.sh)" if not cfg.postgres_url else "given"
    )
    results = OverheadResults(config=described, machine=machine_info())
    try:
        for server in servers:  # one at a time: start-ups must not overlap the loads
            server.start()
            server.wait_ready(900)
        targets = {}
        for server in servers:
            # A tenant key on tenantlora: the load goes through the whole tenant layer.
            tenant = f"bench-{server.port}"
            key = (
                create_tenant_key(server, tenant) if "TENANTLORA_ADMIN_KEY" in server.env else None
            )
            targets[server.name] = Target("base", server.base_url, server.name, key)
            _load(replace(cfg, requests=cfg.concurrency), targets[server.name])  # warm-up
        for index in range(cfg.rounds):
            for server in servers:
                before = list(os.getloadavg())
                summary = _load(cfg, targets[server.name])
                results.rounds.append(
                    Round(
                        server=server.name,
                        round=index,
                        output_throughput=summary.output_throughput,
                        request_throughput=summary.request_throughput,
                        ttft_ms_mean=summary.ttft_ms.get("mean"),
                        tpot_ms_mean=summary.tpot_ms.get("mean"),
                        failed=summary.failed,
                        loadavg_before=before,
                        loadavg_after=list(os.getloadavg()),
                    )
                )
                log.info(
                    "round %d %s: %.1f tok/s, TTFT %.0f ms, load %.2f -> %.2f",
                    index, server.name, summary.output_throughput,
                    summary.ttft_ms.get("mean") or -1, before[0], os.getloadavg()[0],
                )  # fmt: skip
    finally:
        for server in servers:
            server.stop()
    results.machine.load_average_end = list(os.getloadavg())
    results.analysis = analyse(results.rounds)
    if results.machine.load_average_start and results.machine.load_average_start[0] > BUSY_LOAD:
        results.notes.append(
            f"Load average {results.machine.load_average_start[0]:.2f} at the start (> {BUSY_LOAD}):"
            " the machine was not quiet; treat the figures as indicative only."
        )
    return results


def analyse(rounds: list[Round]) -> dict[str, Any]:
    by_round: dict[int, dict[str, Round]] = {}
    for r in rounds:
        by_round.setdefault(r.round, {})[r.server] = r
    goals: dict[str, Goal] = {}
    medians: dict[str, float] = {}
    for db in ("sqlite", "postgresql"):
        ratios = [
            rs[f"tenantlora-{db}"].output_throughput / rs["vllm-serve"].output_throughput
            for rs in by_round.values()
            if rs["vllm-serve"].output_throughput > 0
        ]
        ratio = statistics.median(ratios) if ratios else 0.0
        medians[db] = ratio
        goals[f"throughput_vs_vllm_serve_{db}"] = Goal(
            value=round(ratio, 3),
            goal=f">= {GOAL_RATIO} (base-only output tok/s, tenantlora on {db} / vllm serve)",
            met=ratio >= GOAL_RATIO,
            basis="median of per-round ratios",
            figures={f"round_{i}": round(x, 3) for i, x in enumerate(ratios)},
        )
    return {
        "goals": {k: asdict(v) for k, v in goals.items()},
        "median_ratio": medians,
        # During a load the engine's own threads and the client raise the load average; the
        # quiet-machine check is the load average before any server started (machine.*).
        "load_average_max_during_loads": max(
            (max(r.loadavg_before[0], r.loadavg_after[0]) for r in rounds), default=None
        ),
    }


def markdown(results: OverheadResults, plot_name: str) -> str:
    m = results.machine
    lines = [
        "# Tenant-layer overhead: tenantlora serve vs vllm serve (base model only)",
        "",
        f"Machine: {m.cpu}, {m.logical_cores} cores; vLLM {m.versions.get('vllm')}; "
        f"commit {m.git_commit}; load average {m.load_average_start[0]:.2f} before any server "
        f"started (nothing else ran on the machine), {(m.load_average_end or [0])[0]:.2f} at the "
        "end; the load averages per round include the benchmark's own engine and client threads.",
        "",
        f"Load: {results.config['requests']} requests, concurrency {results.config['concurrency']}, "
        f"{results.config['prompt_words']}-word prompts, {results.config['max_tokens']} tokens out "
        "(ignore_eos, greedy), completions API, streamed; the same engine settings on every "
        "server (LoRA enabled, same slots, rank, target modules, dtype, KV cache, CPU LoRA ops). "
        "tenantlora requests carry a tenant key.",
        "",
        "| round | server | output tok/s | req/s | mean TTFT ms | mean TPOT ms | failed | load before/after |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results.rounds:
        lines.append(
            f"| {r.round} | {r.server} | {r.output_throughput:.1f} | {r.request_throughput:.2f} | "
            f"{r.ttft_ms_mean or 0:.0f} | {r.tpot_ms_mean or 0:.1f} | {r.failed} | "
            f"{r.loadavg_before[0]:.2f} / {r.loadavg_after[0]:.2f} |"
        )
    lines += ["", "| goal | value | target | met |", "|---|---|---|---|"]
    for name, goal in results.analysis["goals"].items():
        lines.append(f"| {name} | {goal['value']} | {goal['goal']} | {goal['met']} |")
    lines += ["", f"![throughput per round]({plot_name})", ""]
    lines += [f"- {n}" for n in results.notes]
    return "\n".join(lines) + "\n"


def plot(results: OverheadResults, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["vllm-serve", "tenantlora-sqlite", "tenantlora-postgresql"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for name in names:
        rows = [r for r in results.rounds if r.server == name]
        ax.plot([r.round for r in rows], [r.output_throughput for r in rows], "o-", label=name)
    ax.set_xlabel("round")
    ax.set_ylabel("output tokens/s (base model)")
    ax.set_title("tenant layer overhead, same engine settings")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write(results: OverheadResults, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "overhead.json", "md": out_dir / "overhead.md"}
    paths["png"] = plot(results, out_dir / "overhead.png")
    paths["json"].write_text(json.dumps(asdict(results), indent=2) + "\n")
    paths["md"].write_text(markdown(results, paths["png"].name))
    return paths


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-model", default="smollm2-135m-instruct")
    parser.add_argument("--work-dir", default=".cache/bench-overhead")
    parser.add_argument("--out-dir", default=str(RESULTS_DIR))
    parser.add_argument("--postgres-url", default=None, help="Default: start a private one.")
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="Smoke size (a few minutes).")


def cli(args: argparse.Namespace) -> int:
    from serving.base_model import resolve_base_model
    from serving.settings import Settings

    base = str(resolve_base_model(args.base_model, Settings().models_dir))
    common = {
        "base_model": base,
        "work_dir": Path(args.work_dir).resolve(),
        "out_dir": Path(args.out_dir).resolve(),
        "postgres_url": args.postgres_url,
    }
    if args.quick:
        cfg = OverheadConfig.quick(**common)
    else:
        cfg = OverheadConfig(
            **common, requests=args.requests, concurrency=args.concurrency, rounds=args.rounds
        )
    results = run(cfg)
    for kind, path in write(results, cfg.out_dir).items():
        print(f"{kind}: {path}")
    for name, goal in results.analysis["goals"].items():
        print(f"{name}: {goal['value']} ({goal['goal']}) met={goal['met']}")
    return 0

"""Noisy neighbour: does one tenant's flood hurt another tenant's latency?

A victim tenant sends a light Poisson load on its own adapter, first alone, then while a flooding
tenant keeps many requests in flight on another adapter. The same is measured on three servers,
one after the other, in one run: tenantlora with fair admission on, tenantlora with it off
(first come first served), and vLLM's own server with the same adapters. Each tenant has its own
API key on tenantlora (so admission tells them apart); vLLM's server has no tenants.

    tenantlora bench noisy-neighbour            # the full size (run it on an otherwise idle machine)
    tenantlora bench noisy-neighbour --quick    # a smoke-test size

Writes `<name>.json` (with `analysis.goals`: value, goal, met), `<name>.md` and `<name>.png` (the
victim's time-to-first-token distribution: alone, and during the flood on each server) under
benchmarks/results/."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import secrets
import time
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from benchmarks.load import LengthDist, LoadConfig, LoadResult, Target, run_load
from benchmarks.records import Goal
from benchmarks.servers import Server, create_tenant_key, tenantlora_server, vllm_server

log = logging.getLogger(__name__)

RESULTS_DIR = Path(__file__).resolve().parent / "results"
CASES = ("fair", "fcfs", "vllm")
CASE_TITLES = {
    "fair": "tenantlora, fair admission",
    "fcfs": "tenantlora, first come first served",
    "vllm": "vllm serve",
}


@dataclass
class NoisyConfig:
    base_model: str
    work_dir: Path
    out_dir: Path = RESULTS_DIR
    name: str = "noisy_neighbour"
    # The victim: light Poisson load (the measurement: 8 requests at 0.5 req/s, 64/32).
    victim_requests: int = 8
    victim_rate: float = 0.5
    victim_prompt: int = 64
    victim_max_tokens: int = 32
    # The flood: many requests in flight (160 at concurrency 64, 64/128).
    flood_requests: int = 160
    flood_concurrency: int = 64
    flood_prompt: int = 64
    flood_max_tokens: int = 128
    flood_head_start: float = 5.0  # seconds of flood before the victim starts
    max_model_len: int = 1024
    kv_cache_gib: float = 1.0
    cases: tuple[str, ...] = CASES

    @classmethod
    def quick(cls, **kw: Any) -> NoisyConfig:
        return cls(
            **{
                "name": "noisy_neighbour_quick",
                "victim_requests": 3,
                "victim_rate": 1.0,
                "victim_max_tokens": 8,
                "flood_requests": 24,
                "flood_concurrency": 12,
                "flood_max_tokens": 24,
                "flood_head_start": 2.0,
                "max_model_len": 512,
                "kv_cache_gib": 0.5,
                **kw,
            }
        )

    def load(self, target: Target, who: str) -> LoadConfig:
        if who == "victim":
            return LoadConfig(
                [target],
                rate=self.victim_rate,
                concurrency=None,
                requests=self.victim_requests,
                duration=self.victim_requests / self.victim_rate * 4 + 60,
                prompt_len=LengthDist("fixed", self.victim_prompt),
                max_tokens=LengthDist("fixed", self.victim_max_tokens),
                request_timeout=600,
                seed=1,
            )
        return LoadConfig(
            [target],
            rate=None,
            concurrency=self.flood_concurrency,
            requests=self.flood_requests,
            duration=3600,
            prompt_len=LengthDist("fixed", self.flood_prompt),
            max_tokens=LengthDist("fixed", self.flood_max_tokens),
            request_timeout=600,
            seed=2,
        )


def _server(cfg: NoisyConfig, case: str, loras: dict[str, Path]) -> Server:
    log_dir = cfg.work_dir / "logs"
    common = dict(
        max_loras=2, max_cpu_loras=2, max_model_len=cfg.max_model_len, kv_cache_gib=cfg.kv_cache_gib
    )
    if case == "vllm":
        return vllm_server(f"noisy-{case}", cfg.base_model, loras, log_dir, **common)
    server = tenantlora_server(
        f"noisy-{case}",
        cfg.base_model,
        loras,
        log_dir,
        cfg.work_dir / f"data-{case}",
        **common,
    )
    server.env["TENANTLORA_ADMIN_KEY"] = secrets.token_urlsafe(24)
    server.env["TENANTLORA_FAIR_ADMISSION"] = "true" if case == "fair" else "false"
    return server


def _targets(server: Server, case: str) -> dict[str, Target]:
    """victim -> adapter lora000, flooder -> lora001 (each with its own tenant key on ours)."""
    out = {}
    for who, model in (("victim", "lora000"), ("flooder", "lora001")):
        key = None if case == "vllm" else create_tenant_key(server, who)
        out[who] = Target(model, server.base_url, tenant=who, api_key=key)
    return out


def _refusals(server: Server) -> dict[str, float]:
    """tenantlora_admission_refused_total by tenant/reason (ours only), non-zero ones."""
    from prometheus_client.parser import text_string_to_metric_families

    key = server.env.get("TENANTLORA_ADMIN_KEY")
    if not key:
        return {}
    page = httpx.get(
        server.root_url + "/metrics",
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
        trust_env=False,
    )
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(page.text):
        for s in family.samples:
            if s.name == "tenantlora_admission_refused_total" and s.value:
                out[f"{s.labels['tenant']}/{s.labels['reason']}"] = s.value
    return out


async def _victim_during_flood(
    cfg: NoisyConfig, targets: dict[str, Target]
) -> tuple[LoadResult, LoadResult]:
    async def victim() -> LoadResult:
        await asyncio.sleep(cfg.flood_head_start)
        return await run_load(cfg.load(targets["victim"], "victim"), progress=False)

    flood, hurt = await asyncio.gather(
        run_load(cfg.load(targets["flooder"], "flooder"), progress=False), victim()
    )
    return flood, hurt


def _statuses(*results: LoadResult) -> dict[str, dict[str, int]]:
    """Error counts by tenant (`http_429`, `http_503`, `timeout`, ...)."""
    out: dict[str, dict[str, int]] = {}
    for result in results:
        for r in result.requests:
            if r.error:
                bucket = out.setdefault(r.tenant, {})
                bucket[r.error] = bucket.get(r.error, 0) + 1
    return out


def run_case(cfg: NoisyConfig, case: str, loras: dict[str, Path]) -> dict[str, Any]:
    server = _server(cfg, case, loras)
    server.start()
    try:
        ready_s = server.wait_ready(timeout=900)
        targets = _targets(server, case)
        # Warm up: each adapter loaded once before anything is measured.
        for target in targets.values():
            warm = LoadConfig([target], requests=1, max_tokens=LengthDist("fixed", 2))
            asyncio.run(run_load(warm, progress=False))
        log.info("%s: victim alone", case)
        alone = asyncio.run(run_load(cfg.load(targets["victim"], "victim"), progress=False))
        log.info("%s: victim during the flood", case)
        flood, hurt = asyncio.run(_victim_during_flood(cfg, targets))
        return {
            "case": case,
            "title": CASE_TITLES[case],
            "ready_s": ready_s,
            "victim_alone": asdict(alone.summary),
            "victim_flood": asdict(hurt.summary),
            "flooder": asdict(flood.summary),
            "victim_ttft_s": {
                "alone": [r.ttft for r in alone.requests if r.ttft is not None and not r.error],
                "flood": [r.ttft for r in hurt.requests if r.ttft is not None and not r.error],
            },
            "errors": _statuses(alone, hurt, flood),
            "refusals": _refusals(server),
        }
    finally:
        server.stop()


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def analyse(runs: dict[str, dict[str, Any]]) -> dict[str, Goal]:
    goals: dict[str, Goal] = {}
    fair, fcfs = runs.get("fair"), runs.get("fcfs")
    if fair:
        alone, flood = (
            fair["victim_alone"]["ttft_ms"]["p99"],
            fair["victim_flood"]["ttft_ms"]["p99"],
        )
        ratio = _ratio(flood, alone)
        goals["victim_p99_ttft_flood_vs_alone"] = Goal(
            value=ratio if ratio is not None else float("nan"),
            goal="<= 2.0",
            met=ratio is not None and ratio <= 2.0,
            figures={"p99_alone_ms": alone or 0.0, "p99_flood_ms": flood or 0.0},
        )
    if fair and fcfs:
        on, off = fair["flooder"]["output_throughput"], fcfs["flooder"]["output_throughput"]
        ratio = _ratio(on, off)
        goals["flooder_throughput_fair_vs_fcfs"] = Goal(
            value=ratio if ratio is not None else float("nan"),
            goal=">= 0.9",
            met=ratio is not None and ratio >= 0.9,
            figures={"fair_tok_s": on, "fcfs_tok_s": off},
        )
    ours = [runs[c] for c in ("fair", "fcfs") if c in runs]
    errors_5xx = sum(
        n
        for run in ours
        for tenant in run["errors"].values()
        for kind, n in tenant.items()
        if kind.startswith("http_5")
    )
    goals["server_errors_5xx"] = Goal(value=errors_5xx, goal="== 0", met=errors_5xx == 0)
    victim_429 = sum(run["errors"].get("victim", {}).get("http_429", 0) for run in ours)
    flooder_429 = sum(run["errors"].get("flooder", {}).get("http_429", 0) for run in ours)
    goals["victim_429s"] = Goal(
        value=victim_429,
        goal="== 0 (429s only to the tenant over its own limit: the flooder)",
        met=victim_429 == 0,
        figures={"flooder_429s": flooder_429},
    )
    return goals


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


def markdown(results: dict[str, Any], plot_name: str) -> str:
    cfg = results["config"]
    lines = [
        f"# Noisy neighbour ({results['name']})",
        "",
        f"{results['started_utc']}, {results['machine']['cpu']} ({results['machine']['cores']} "
        f"cores), load average {results['machine']['load_average_start']} at the start and "
        f"{results['machine']['load_average_end']} at the end.",
        "",
        f"Victim: {cfg['victim_requests']} requests at {cfg['victim_rate']} req/s, "
        f"{cfg['victim_prompt']} prompt / {cfg['victim_max_tokens']} output tokens. Flood: "
        f"{cfg['flood_requests']} requests at concurrency {cfg['flood_concurrency']}, "
        f"{cfg['flood_prompt']} / {cfg['flood_max_tokens']} tokens, starting "
        f"{cfg['flood_head_start']} s before the victim. One r=16 adapter per tenant.",
        "",
        "| server | victim TTFT alone p50 / p99 (ms) | during flood p50 / p99 (ms) | p99 ratio "
        "| flooder tok/s | errors |",
        "|---|---|---|---|---|---|",
    ]
    for case in results["runs"].values():
        a, f = case["victim_alone"]["ttft_ms"], case["victim_flood"]["ttft_ms"]
        ratio = _ratio(f["p99"], a["p99"])
        lines.append(
            f"| {case['title']} | {_ms(a['p50'])} / {_ms(a['p99'])} | {_ms(f['p50'])} / "
            f"{_ms(f['p99'])} | {'-' if ratio is None else f'{ratio:.1f}x'} | "
            f"{case['flooder']['output_throughput']:.1f} | {json.dumps(case['errors']) or '-'} |"
        )
    lines += ["", "| goal | value | target | met |", "|---|---|---|---|"]
    for name, goal in results["analysis"]["goals"].items():
        lines.append(f"| {name} | {goal['value']:.3g} | {goal['goal']} | {goal['met']} |")
    lines += ["", f"![victim TTFT]({plot_name})", ""]
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> Path:
    from benchmarks.report import _pyplot

    plt = _pyplot()
    runs = results["runs"]
    data, labels = [], []
    first = next(iter(runs.values()))
    data.append(first["victim_ttft_s"]["alone"])
    labels.append(f"alone\n({first['title']})")
    for run in runs.values():
        data.append(run["victim_ttft_s"]["flood"])
        labels.append(f"flood\n{run['title']}")
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.boxplot([d or [float("nan")] for d in data], whis=(0, 100))
    for i, values in enumerate(data, start=1):
        ax.scatter([i] * len(values), values, s=12, alpha=0.6)
    ax.set_xticks(range(1, len(labels) + 1), labels, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("victim time to first token (s, log)")
    ax.set_title("Victim TTFT alone and during another tenant's flood")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(cfg: NoisyConfig) -> dict[str, Any]:
    from benchmarks.adapters_fixture import make_adapters
    from benchmarks.harness import machine_info

    started = time.perf_counter()
    machine = machine_info()
    adapters = make_adapters(cfg.base_model, cfg.work_dir, 2)
    runs = {case: run_case(cfg, case, adapters) for case in cfg.cases}
    config = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()}
    results = {
        "name": cfg.name,
        "started_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpu": machine.cpu,
            "cores": machine.logical_cores,
            "versions": machine.versions,
            "git_commit": machine.git_commit,
            "load_average_start": machine.load_average_start,
            "load_average_end": list(os.getloadavg()),
        },
        "config": config,
        "runs": runs,
        "analysis": {"goals": {k: asdict(g) for k, g in analyse(runs).items()}},
        "wall_s": time.perf_counter() - started,
    }
    return results


def write(results: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    name = results["name"]
    png = plot(results, out_dir / f"{name}.png")
    paths = {"json": out_dir / f"{name}.json", "markdown": out_dir / f"{name}.md", "png": png}
    paths["json"].write_text(json.dumps(results, indent=1, default=str))
    paths["markdown"].write_text(markdown(results, png.name))
    return paths


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="Smoke-test size (a few minutes)")
    parser.add_argument("--base-model", default="smollm2-135m-instruct")
    parser.add_argument("--models-dir", help="Where the embedded base model is prepared")
    parser.add_argument("--work-dir", default="/tmp/tenantlora-bench-noisy")
    parser.add_argument("--out-dir", default=str(RESULTS_DIR))
    parser.add_argument("--name", help="Report file prefix")
    parser.add_argument(
        "--cases", default=",".join(CASES), help=f"Comma-separated subset of {','.join(CASES)}"
    )
    parser.add_argument("--flood-requests", type=int)
    parser.add_argument("--flood-concurrency", type=int)
    parser.add_argument("--victim-requests", type=int)


def cli(args: argparse.Namespace) -> int:
    from serving.base_model import resolve_base_model
    from serving.settings import Settings

    models_dir = Path(args.models_dir) if args.models_dir else Settings().models_dir
    cases = tuple(c for c in args.cases.split(",") if c)
    if unknown := set(cases) - set(CASES):
        raise SystemExit(f"unknown cases: {sorted(unknown)}")
    cfg = (NoisyConfig.quick if args.quick else NoisyConfig)(
        base_model=str(resolve_base_model(args.base_model, models_dir)),
        work_dir=Path(args.work_dir).expanduser().resolve(),
        out_dir=Path(args.out_dir).expanduser().resolve(),
        cases=cases,
    )
    overrides = {
        k: getattr(args, k)
        for k in ("name", "flood_requests", "flood_concurrency", "victim_requests")
        if getattr(args, k) is not None
    }
    cfg = replace(cfg, **overrides)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    results = run(cfg)
    for kind, path in write(results, cfg.out_dir).items():
        print(f"{kind}: {path}")
    print(json.dumps({k: g["value"] for k, g in results["analysis"]["goals"].items()}, indent=1))
    errors = results["analysis"]["goals"]["server_errors_5xx"]["value"]
    return 1 if errors else 0

"""Load generator for any OpenAI-compatible endpoint (tenantlora, vLLM's server, LoRAX, ...).

Open-loop Poisson arrivals at ``--rate`` requests/s (optionally capped by ``--concurrency``), or a
closed loop of ``--concurrency`` requests in flight. Every run is bounded by ``--requests`` and
``--duration``: no request is started after the duration, requests still running when the duration
plus ``--request-timeout`` has passed are cancelled, so the run always stops by itself. Each
request picks its target (model = adapter name, tenant, endpoint) by a Zipf popularity; prompt and
output lengths come from the given distributions. Requests stream, so each one records time to
first token, time per output token and end-to-end latency. Only the endpoints given are contacted
(no redirects, no proxies from the environment).

    tenantlora bench load --base-url http://127.0.0.1:8000/v1 --models a,b,c \\
        --zipf 1.1 --rate 4 --requests 200 --duration 120 --prompt-len uniform:32:128 --max-tokens 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

import httpx

log = logging.getLogger(__name__)

# Common English words (benchmarks/data/words.txt); most are one token for Llama-family
# tokenizers, so a prompt of n words is close to n tokens. The exact count comes back from the
# server in `usage.prompt_tokens`.
_WORDS: tuple[str, ...] = tuple((files("benchmarks") / "data" / "words.txt").read_text().split())


@dataclass(frozen=True)
class Target:
    """One addressable model: the `model` field to send, the tenant it belongs to, its endpoint."""

    model: str
    base_url: str
    tenant: str = ""
    api_key: str | None = None

    def label(self) -> str:
        return self.tenant or self.model


@dataclass(frozen=True)
class LengthDist:
    """A token-count distribution: ``64`` (fixed), ``uniform:LO:HI``, ``normal:MEAN:SD``."""

    kind: str
    a: float
    b: float = 0.0

    @classmethod
    def parse(cls, text: str) -> LengthDist:
        parts = str(text).split(":")
        if len(parts) == 1:
            return cls("fixed", float(parts[0]))
        if parts[0] in ("uniform", "normal") and len(parts) == 3:
            return cls(parts[0], float(parts[1]), float(parts[2]))
        raise ValueError(
            f"bad length distribution {text!r}: use N, uniform:LO:HI or normal:MEAN:SD"
        )

    def sample(self, rng: random.Random) -> int:
        if self.kind == "fixed":
            value = self.a
        elif self.kind == "uniform":
            value = rng.uniform(self.a, self.b)
        else:
            value = rng.gauss(self.a, self.b)
        return max(1, round(value))

    def __str__(self) -> str:
        return str(int(self.a)) if self.kind == "fixed" else f"{self.kind}:{self.a:g}:{self.b:g}"


@dataclass
class LoadConfig:
    """Everything one load run needs."""

    targets: list[Target]
    zipf: float = 1.1
    rate: float | None = None
    concurrency: int | None = 8
    requests: int = 64
    duration: float = 120.0
    prompt_len: LengthDist = field(default_factory=lambda: LengthDist("fixed", 64))
    max_tokens: LengthDist = field(default_factory=lambda: LengthDist("fixed", 64))
    api: str = "completions"
    ignore_eos: bool = True
    temperature: float = 0.0
    request_timeout: float = 120.0
    seed: int = 0
    # Sent with every request (e.g. llama.cpp's logit_bias on its end tokens, which stands in for
    # ignore_eos there).
    extra_body: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.targets:
            raise ValueError("no targets")
        if self.rate is None and not self.concurrency:
            raise ValueError("give a rate, a concurrency, or both")
        if self.rate is not None and self.rate <= 0:
            raise ValueError("rate must be positive")
        if self.requests < 1 or self.duration <= 0:
            raise ValueError("requests and duration bound every run: both must be positive")
        if self.api not in ("completions", "chat"):
            raise ValueError("api is 'completions' or 'chat'")

    def describe(self) -> dict[str, Any]:
        return {
            "targets": len(self.targets),
            "endpoints": sorted({t.base_url for t in self.targets}),
            "zipf": self.zipf,
            "rate": self.rate,
            "concurrency": self.concurrency,
            "requests": self.requests,
            "duration_s": self.duration,
            "prompt_len": str(self.prompt_len),
            "max_tokens": str(self.max_tokens),
            "api": self.api,
            "ignore_eos": self.ignore_eos,
            "seed": self.seed,
        }


@dataclass
class RequestRecord:
    """The outcome of one request (times in seconds; ``start`` relative to the run's start)."""

    index: int
    model: str
    tenant: str
    base_url: str
    start: float
    prompt_words: int
    max_tokens: int
    ttft: float | None = None
    e2e: float | None = None
    tpot: float | None = None
    prompt_tokens: int | None = None
    output_tokens: int = 0
    error: str | None = None
    error_detail: str | None = None


@dataclass
class ModelUsage:
    """One target's share of a run."""

    tenant: str
    requests: int = 0
    ok: int = 0
    output_tokens: int = 0
    e2e_ms_mean: float | None = None


@dataclass
class LoadSummary:
    """Aggregates of one run. Latencies are ``percentiles`` maps (mean, p50, p95, p99) in ms."""

    requests_sent: int
    requests_not_started: int
    completed: int
    failed: int
    errors: dict[str, int]
    duration_s: float
    wall_s: float
    request_throughput: float
    output_throughput: float
    total_output_tokens: int
    total_prompt_tokens: int
    ttft_ms: dict[str, float | None]
    tpot_ms: dict[str, float | None]
    e2e_ms: dict[str, float | None]
    models_used: int
    by_model: dict[str, ModelUsage]


@dataclass
class LoadResult:
    """One run: its configuration (as ``LoadConfig.describe`` gives it), summary and requests."""

    config: dict[str, Any]
    summary: LoadSummary
    requests: list[RequestRecord]


def zipf_weights(n: int, exponent: float) -> list[float]:
    """Normalised Zipf popularity of ranks 1..n (exponent 0 = uniform)."""
    raw = [1.0 / (k**exponent) for k in range(1, n + 1)]
    total = sum(raw)
    return [w / total for w in raw]


def make_prompt(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(words))


@dataclass
class _Planned:
    index: int
    arrival: float
    target: Target
    prompt: str
    prompt_words: int
    max_tokens: int


def plan(cfg: LoadConfig) -> list[_Planned]:
    """The request schedule: arrival offsets, targets by Zipf, lengths, prompts (seeded)."""
    rng = random.Random(cfg.seed)
    weights = zipf_weights(len(cfg.targets), cfg.zipf)
    t = 0.0
    out = []
    for i in range(cfg.requests):
        if cfg.rate is not None:
            t += rng.expovariate(cfg.rate)
        target = rng.choices(cfg.targets, weights)[0]
        words = cfg.prompt_len.sample(rng)
        out.append(
            _Planned(i, t, target, make_prompt(rng, words), words, cfg.max_tokens.sample(rng))
        )
    return out


def _payload(cfg: LoadConfig, item: _Planned) -> tuple[str, dict[str, Any]]:
    body: dict[str, Any] = {
        "model": item.target.model,
        "max_tokens": item.max_tokens,
        "temperature": cfg.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if cfg.ignore_eos:
        body["ignore_eos"] = True  # vLLM / LoRAX extension; plain OpenAI servers ignore it
    body.update(cfg.extra_body)
    if cfg.api == "chat":
        body["messages"] = [{"role": "user", "content": item.prompt}]
        return "/chat/completions", body
    body["prompt"] = item.prompt
    return "/completions", body


def _chunk_text(chunk: dict[str, Any]) -> str | None:
    choices = chunk.get("choices") or []
    if not choices:
        return None
    choice = choices[0]
    if "delta" in choice:
        return (choice.get("delta") or {}).get("content") or ""
    return choice.get("text") or ""


async def _send(
    client: httpx.AsyncClient, cfg: LoadConfig, item: _Planned, t0: float
) -> RequestRecord:
    rec = RequestRecord(
        index=item.index,
        model=item.target.model,
        tenant=item.target.label(),
        base_url=item.target.base_url,
        start=time.perf_counter() - t0,
        prompt_words=item.prompt_words,
        max_tokens=item.max_tokens,
    )
    path, body = _payload(cfg, item)
    headers = {"Authorization": f"Bearer {item.target.api_key}"} if item.target.api_key else {}
    url = item.target.base_url.rstrip("/") + path
    sent = time.perf_counter()
    chunks = 0
    usage: dict[str, Any] | None = None
    done = False
    try:
        async with client.stream("POST", url, json=body, headers=headers) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                rec.error = f"http_{resp.status_code}"
                rec.error_detail = text[:300]
                return rec
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    rec.error = "stream_error"
                    rec.error_detail = json.dumps(chunk["error"])[:300]
                    return rec
                if chunk.get("usage"):
                    usage = chunk["usage"]
                text = _chunk_text(chunk)
                if text is None:
                    continue
                if rec.ttft is None:
                    rec.ttft = time.perf_counter() - sent
                if text:
                    chunks += 1
    except httpx.TimeoutException as exc:
        rec.error, rec.error_detail = "timeout", type(exc).__name__
        return rec
    except httpx.ConnectError as exc:
        rec.error, rec.error_detail = "connect", str(exc)[:300]
        return rec
    except httpx.HTTPError as exc:
        rec.error, rec.error_detail = "http_transport", f"{type(exc).__name__}: {exc}"[:300]
        return rec
    except json.JSONDecodeError as exc:
        rec.error, rec.error_detail = "bad_stream", str(exc)[:300]
        return rec
    rec.e2e = time.perf_counter() - sent
    if not done:
        rec.error = "stream_incomplete"
        return rec
    if usage:
        rec.output_tokens = int(usage.get("completion_tokens") or chunks)
        rec.prompt_tokens = usage.get("prompt_tokens")
    else:
        rec.output_tokens = chunks
    if rec.ttft is None:
        rec.error = "no_output"
    elif rec.output_tokens > 1:
        rec.tpot = (rec.e2e - rec.ttft) / (rec.output_tokens - 1)
    return rec


async def run_load(
    cfg: LoadConfig, progress: bool = True, schedule: list[_Planned] | None = None
) -> LoadResult:
    """Run one bounded load.

    ``schedule`` overrides the seeded plan (e.g. to visit every target exactly once)."""
    schedule = plan(cfg) if schedule is None else schedule
    sem = asyncio.Semaphore(cfg.concurrency) if cfg.concurrency else None
    limits = httpx.Limits(max_connections=(cfg.concurrency or 256), max_keepalive_connections=64)
    timeout = httpx.Timeout(cfg.request_timeout, connect=10.0)
    records: list[RequestRecord] = []
    tasks: list[asyncio.Task[RequestRecord]] = []
    t0 = time.perf_counter()
    deadline = t0 + cfg.duration
    finished = 0

    async def guarded(item: _Planned) -> RequestRecord:
        nonlocal finished
        try:
            return await _send(client, cfg, item, t0)
        finally:
            if sem is not None:
                sem.release()
            finished += 1
            if progress and (finished % max(1, cfg.requests // 10) == 0):
                log.info(
                    "load: %d/%d done (%.0fs)", finished, cfg.requests, time.perf_counter() - t0
                )

    async with httpx.AsyncClient(
        timeout=timeout, limits=limits, follow_redirects=False, trust_env=False
    ) as client:
        for item in schedule:
            now = time.perf_counter()
            wait = t0 + item.arrival - now
            if t0 + item.arrival >= deadline:
                break
            if wait > 0:
                await asyncio.sleep(wait)
            if sem is not None:
                try:
                    await asyncio.wait_for(
                        sem.acquire(), timeout=max(0.0, deadline - time.perf_counter())
                    )
                except TimeoutError:
                    break
            if time.perf_counter() >= deadline:
                if sem is not None:
                    sem.release()
                break
            tasks.append(asyncio.create_task(guarded(item)))
        not_started = cfg.requests - len(tasks)
        if tasks:
            hard_stop = max(deadline, time.perf_counter()) + cfg.request_timeout
            done, pending = await asyncio.wait(tasks, timeout=hard_stop - time.perf_counter())
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
    for task, item in zip(tasks, schedule, strict=False):
        if task.cancelled():
            records.append(
                RequestRecord(
                    item.index,
                    item.target.model,
                    item.target.label(),
                    item.target.base_url,
                    item.arrival,
                    item.prompt_words,
                    item.max_tokens,
                    error="cancelled",
                )
            )
        else:
            records.append(task.result())
    wall = time.perf_counter() - t0
    return LoadResult(cfg.describe(), summarize(records, wall, not_started), records)


def percentiles(values: list[float], scale: float = 1000.0) -> dict[str, float | None]:
    """Mean and p50/p95/p99 (linear interpolation), scaled (seconds -> ms by default)."""
    if not values:
        return {"mean": None, "p50": None, "p95": None, "p99": None}
    vals = sorted(values)

    def pct(q: float) -> float:
        pos = (len(vals) - 1) * q
        lo = int(pos)
        hi = min(lo + 1, len(vals) - 1)
        return vals[lo] + (vals[hi] - vals[lo]) * (pos - lo)

    return {
        "mean": scale * sum(vals) / len(vals),
        "p50": scale * pct(0.50),
        "p95": scale * pct(0.95),
        "p99": scale * pct(0.99),
    }


def summarize(records: list[RequestRecord], wall: float, not_started: int = 0) -> LoadSummary:
    """Aggregate records: throughput over the run's busy span, latency percentiles, errors."""
    ok = [r for r in records if r.error is None]
    if records:
        span_start = min(r.start for r in records)
        span_end = max(r.start + (r.e2e or 0.0) for r in records)
        span = max(span_end - span_start, 1e-9)
    else:
        span = wall
    out_tokens = sum(r.output_tokens for r in ok)
    by_model: dict[str, ModelUsage] = {}
    e2e: dict[str, list[float]] = {}
    for r in records:
        usage = by_model.setdefault(r.model, ModelUsage(r.tenant))
        usage.requests += 1
        if r.error is None:
            usage.ok += 1
            usage.output_tokens += r.output_tokens
            e2e.setdefault(r.model, []).append(r.e2e or 0.0)
    for model, times in e2e.items():
        by_model[model].e2e_ms_mean = 1000 * sum(times) / len(times)
    return LoadSummary(
        requests_sent=len(records),
        requests_not_started=not_started,
        completed=len(ok),
        failed=len(records) - len(ok),
        errors=dict(Counter(r.error for r in records if r.error)),
        duration_s=span,
        wall_s=wall,
        request_throughput=len(ok) / span,
        output_throughput=out_tokens / span,
        total_output_tokens=out_tokens,
        total_prompt_tokens=sum(r.prompt_tokens or 0 for r in ok),
        ttft_ms=percentiles([r.ttft for r in ok if r.ttft is not None]),
        tpot_ms=percentiles([r.tpot for r in ok if r.tpot is not None]),
        e2e_ms=percentiles([r.e2e for r in ok if r.e2e is not None]),
        models_used=len(by_model),
        by_model=by_model,
    )


def format_summary(s: LoadSummary) -> str:
    """A short human-readable table of one run."""

    def f(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"

    lines = [
        f"completed {s.completed}/{s.requests_sent} (not started {s.requests_not_started}) "
        f"in {s.duration_s:.1f}s; errors {s.errors or 'none'}",
        f"throughput {s.request_throughput:.2f} req/s, "
        f"{s.output_throughput:.1f} output tok/s over {s.models_used} models",
        f"{'ms':<6}{'mean':>10}{'p50':>10}{'p95':>10}{'p99':>10}",
    ]
    for key in ("ttft_ms", "tpot_ms", "e2e_ms"):
        p = getattr(s, key)
        lines.append(
            f"{key[:-3]:<6}{f(p['mean']):>10}{f(p['p50']):>10}{f(p['p95']):>10}{f(p['p99']):>10}"
        )
    return "\n".join(lines)


def list_models(base_url: str, api_key: str | None = None, timeout: float = 10.0) -> list[str]:
    """Model ids an endpoint serves (GET /v1/models)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(timeout=timeout, follow_redirects=False, trust_env=False) as client:
        resp = client.get(base_url.rstrip("/") + "/models", headers=headers)
        resp.raise_for_status()
        return [m["id"] for m in resp.json()["data"]]


def targets_from_args(args: argparse.Namespace) -> list[Target]:
    """Targets from ``--targets-file`` (JSON list of {model, base_url, tenant, api_key}) or from
    ``--base-url`` with ``--models`` (default: every model the endpoint lists)."""
    if args.targets_file:
        rows = json.loads(Path(args.targets_file).read_text())
        return [
            Target(
                model=r["model"],
                base_url=r.get("base_url") or args.base_url,
                tenant=r.get("tenant", ""),
                api_key=r.get("api_key", args.api_key),
            )
            for r in rows
        ]
    if not args.base_url:
        raise SystemExit("give --base-url (with --models) or --targets-file")
    models = (
        [m for m in args.models.split(",") if m]
        if args.models
        else list_models(args.base_url, args.api_key)
    )
    tenants = args.tenants.split(",") if args.tenants else []
    return [
        Target(m, args.base_url, tenants[i] if i < len(tenants) else "", args.api_key)
        for i, m in enumerate(models)
    ]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `tenantlora bench load`."""
    parser.add_argument(
        "--base-url", help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1"
    )
    parser.add_argument("--models", help="Comma-separated model names, most popular first")
    parser.add_argument("--tenants", help="Comma-separated tenant labels, one per model")
    parser.add_argument("--targets-file", help="JSON list of {model, base_url, tenant, api_key}")
    parser.add_argument("--api-key", help="Bearer token sent with every request")
    parser.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent of popularity")
    parser.add_argument("--rate", type=float, help="Poisson arrival rate (requests/s)")
    parser.add_argument(
        "--concurrency", type=int, help="Requests in flight (closed loop, or cap with --rate)"
    )
    parser.add_argument("--requests", type=int, default=64, help="Most requests to send")
    parser.add_argument("--duration", type=float, default=120.0, help="Stop starting after (s)")
    parser.add_argument("--prompt-len", default="64", help="N | uniform:LO:HI | normal:MEAN:SD")
    parser.add_argument("--max-tokens", default="64", help="N | uniform:LO:HI | normal:MEAN:SD")
    parser.add_argument("--api", choices=["completions", "chat"], default="completions")
    parser.add_argument(
        "--no-ignore-eos", action="store_true", help="Let generation stop at EOS (lengths vary)"
    )
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--request-timeout", type=float, default=120.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="Write the full result (config, summary, requests) as JSON")


def config_from_args(args: argparse.Namespace) -> LoadConfig:
    concurrency = args.concurrency
    if args.rate is None and concurrency is None:
        concurrency = 8
    return LoadConfig(
        targets=targets_from_args(args),
        zipf=args.zipf,
        rate=args.rate,
        concurrency=concurrency,
        requests=args.requests,
        duration=args.duration,
        prompt_len=LengthDist.parse(args.prompt_len),
        max_tokens=LengthDist.parse(args.max_tokens),
        api=args.api,
        ignore_eos=not args.no_ignore_eos,
        temperature=args.temperature,
        request_timeout=args.request_timeout,
        seed=args.seed,
    )


def cli(args: argparse.Namespace) -> int:
    """Run one load from parsed arguments; print the summary, optionally write JSON."""
    cfg = config_from_args(args)
    result = asyncio.run(run_load(cfg))
    print(format_summary(result.summary))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(asdict(result), indent=1))
        print(f"wrote {args.out}")
    return 0 if result.summary.completed else 1

"""Prometheus metrics, by tenant and adapter, beside vLLM's own engine metrics.

All metrics live in prometheus-client's default registry, which vLLM's engine logger also uses,
so one `/metrics` page carries both (`tenantlora_*` and `vllm:*`)."""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import psutil
from prometheus_client import REGISTRY, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

if TYPE_CHECKING:
    from serving.lease import RequestLease

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300)
TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2, 5)
LABELS = ("tenant", "adapter")

REQUESTS = Counter(
    "tenantlora_requests",
    "Requests by tenant, adapter, route and HTTP status.",
    ("tenant", "adapter", "route", "status"),
)
LATENCY = Histogram(
    "tenantlora_request_latency_seconds",
    "End-to-end request latency.",
    LABELS,
    buckets=LATENCY_BUCKETS,
)
TTFT = Histogram(
    "tenantlora_time_to_first_token_seconds",
    "Time from engine submit to the first token.",
    LABELS,
    buckets=LATENCY_BUCKETS,
)
TPOT = Histogram(
    "tenantlora_time_per_output_token_seconds",
    "Mean time per output token after the first.",
    LABELS,
    buckets=TOKEN_BUCKETS,
)
PROMPT_TOKENS = Counter("tenantlora_prompt_tokens", "Prompt tokens processed.", LABELS)
COMPLETION_TOKENS = Counter("tenantlora_completion_tokens", "Completion tokens generated.", LABELS)
ADAPTER_LOADS = Counter(
    "tenantlora_adapter_loads", "Adapter loads into the engine (cold starts).", ("adapter",)
)
ADAPTER_LOAD_SECONDS = Histogram(
    "tenantlora_adapter_load_seconds",
    "Time to load an adapter into the engine.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10),
)
ADAPTERS_RESIDENT = Gauge(
    "tenantlora_adapters_resident", "Adapters held by the engine (device + host cache)."
)

# Fair sharing and limits (serving/admission.py updates these).
ADMISSION_QUEUE_WAIT = Histogram(
    "tenantlora_admission_queue_wait_seconds",
    "Time a request waited for a slot in the engine (0 when one was free).",
    ("tenant",),
    buckets=(0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120),
)
ADMISSION_REFUSED = Counter(
    "tenantlora_admission_refused", "Requests refused at admission.", ("tenant", "reason")
)
ADMISSION_IN_FLIGHT = Gauge(
    "tenantlora_admission_in_flight", "Requests admitted to the engine.", ("tenant",)
)
ADMISSION_QUEUED = Gauge(
    "tenantlora_admission_queued", "Requests waiting for the engine.", ("tenant",)
)
ADMISSION_TOKENS = Counter(
    "tenantlora_admission_tokens",
    "Tokens reserved at admission (estimated prompt + requested completion tokens).",
    ("tenant",),
)


class _ProcessTreeCollector:
    """Resident memory of the server and its engine processes (and GPU memory on a GPU)."""

    def collect(self):
        rss = GaugeMetricFamily(
            "tenantlora_process_tree_resident_memory_bytes",
            "Resident memory of the API process and its vLLM engine processes.",
        )
        proc = psutil.Process()
        total = 0
        for p in [proc, *proc.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                continue
        rss.add_metric([], total)
        yield rss
        try:
            import torch

            if torch.cuda.is_available():
                gpu = GaugeMetricFamily(
                    "tenantlora_gpu_memory_used_bytes", "GPU memory in use on device 0."
                )
                free, total_gpu = torch.cuda.mem_get_info(0)
                gpu.add_metric([], total_gpu - free)
                yield gpu
        except Exception:  # noqa: BLE001 - metrics must never fail the scrape
            return


REGISTRY.register(_ProcessTreeCollector())


@dataclass(frozen=True)
class RequestLabels:
    tenant: str
    adapter: str


# Every (tenant, adapter) label pair in use, so a deleted adapter's series can be removed.
_SERIES: dict[RequestLabels, set[tuple[Any, tuple[str, ...]]]] = defaultdict(set)


def _child(metric: Any, labels: RequestLabels, *extra: str) -> Any:
    values = (labels.tenant, labels.adapter, *extra)
    _SERIES[labels].add((metric, values))
    return metric.labels(*values)


def forget_adapter(owner: str, pinned_name: str, engine_name: str) -> None:
    """Drop a deleted adapter version's series: its owner's (`name@v`) and those of tenants
    that used it as a public adapter (`owner/name@v`)."""
    for labels in [k for k in _SERIES if (k.tenant, k.adapter) == (owner, pinned_name)]:
        _remove(labels)
    for labels in [k for k in _SERIES if k.adapter == engine_name]:
        _remove(labels)
    with contextlib.suppress(KeyError):
        ADAPTER_LOADS.remove(engine_name)


def forget_tenant(tenant: str) -> None:
    """Drop every series of a deleted tenant."""
    for labels in [k for k in _SERIES if k.tenant == tenant]:
        _remove(labels)


def _remove(labels: RequestLabels) -> None:
    for metric, values in _SERIES.pop(labels, set()):
        with contextlib.suppress(KeyError):
            metric.remove(*values)


def observe_request(labels: RequestLabels, route: str, status: int, seconds: float) -> None:
    _child(REQUESTS, labels, route, str(status)).inc()
    if status < 400:
        _child(LATENCY, labels).observe(seconds)


def render() -> bytes:
    return generate_latest(REGISTRY)


def observe_load(adapter: str, seconds: float) -> None:
    ADAPTER_LOADS.labels(adapter).inc()
    ADAPTER_LOAD_SECONDS.observe(seconds)


class ObservedEngine:
    """Delegates to vLLM's engine client; times each `generate` stream for the metrics above."""

    def __init__(self, engine) -> None:
        self._engine = engine

    def __getattr__(self, name: str):
        return getattr(self._engine, name)

    def generate(self, prompt, sampling_params, *args, **kwargs):
        from vllm.sampling_params import RequestOutputKind

        from serving.lease import current_lease

        lease = current_lease.get()
        delta = getattr(sampling_params, "output_kind", None) == RequestOutputKind.DELTA
        stream = self._engine.generate(prompt, sampling_params, *args, **kwargs)
        return _observe(stream, lease, delta)


async def _observe(stream: AsyncIterator, lease: RequestLease | None, delta: bool) -> AsyncIterator:
    """Time one engine stream. With DELTA outputs each item holds only the new tokens."""
    labels = lease.labels if lease is not None else RequestLabels("unknown", "unknown")
    started = time.perf_counter()
    first: float | None = None
    last = started
    prompt = 0
    tokens: dict[int, int] = {}
    async for output in stream:
        now = time.perf_counter()
        if output.prompt_token_ids:
            prompt = len(output.prompt_token_ids)
        for o in output.outputs:
            tokens[o.index] = (
                tokens.get(o.index, 0) + len(o.token_ids) if delta else len(o.token_ids)
            )
        if first is None and any(tokens.values()):
            first = now
            _child(TTFT, labels).observe(now - started)
        last = now
        yield output
    completion = sum(tokens.values())
    if lease is not None:
        lease.add_tokens(prompt, completion)
    _child(PROMPT_TOKENS, labels).inc(prompt)
    _child(COMPLETION_TOKENS, labels).inc(completion)
    per_seq = max(tokens.values(), default=0)
    if first is not None and per_seq > 1:
        _child(TPOT, labels).observe((last - first) / (per_seq - 1))

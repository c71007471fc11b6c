"""The serving benchmark's results, as typed records. `dataclasses.asdict` turns a `BenchResults`
into the JSON the report writes (benchmarks/report.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from benchmarks.config import BenchConfig
from benchmarks.load import LoadSummary
from benchmarks.quiet import Quietness
from benchmarks.roofline import Roofline


@dataclass
class Memory:
    """RSS and USS (bytes) summed over one server's process tree."""

    rss: int
    uss: int
    processes: int


@dataclass
class FirstRequest:
    """One short streamed request alone on a server (seconds)."""

    ttft_s: float
    e2e_s: float


@dataclass
class MachineInfo:
    """What the numbers were measured on."""

    cpu: str
    logical_cores: int | None
    memory_bytes: int
    gpu_memory_used_bytes: int | None
    platform: str
    python: str
    versions: dict[str, str | None]
    git_commit: str
    load_average_start: list[float]
    load_average_end: list[float] | None = None
    quiet_wait_s: float = 0.0  # waited at start for the load average to fall
    note: str = ""


@dataclass
class EngineRecord:
    """One server the benchmark started, and what it cost."""

    role: str  # "reference", "shared-base", "monolithic", "peft-peer"
    ready_s: float | None
    cmd: str
    first_request: FirstRequest | None = None
    memory: Memory | None = None
    memory_end: Memory | None = None
    cpu_lora_ops: bool | None = None
    tenant: str | None = None
    cold_start_s: float | None = None
    threads: int | None = None


@dataclass
class LoadRun:
    """One bounded load against one server (or several, for the monolithic engines)."""

    label: str
    scenario: str  # base, shared, shared-base-no-adapter, base-rate, shared-rate, peft, ...
    server: str
    adapters: int
    group: str | None
    mode: str  # "rate" or "concurrency"
    rate: float | None
    concurrency: int | None
    loadavg: list[float]  # at the end of the run (includes the run's own threads)
    phases_ms: dict[str, float]  # vLLM's mean queue / prefill / decode / ... time per request
    config: dict[str, Any]
    summary: LoadSummary
    requests: list[dict[str, Any]]
    quiet: Quietness | None = None
    noisy: bool = False  # flagged: the machine was not quiet (see benchmarks.quiet)
    # Share of the run's prompt tokens vLLM found in its prefix cache (None: no vLLM metrics).
    prefix_cache_hit_rate: float | None = None


@dataclass
class HotSwapTrial:
    adapter: str
    cold: FirstRequest
    warm: FirstRequest


@dataclass
class TouchAll:
    """Every adapter loaded once (1-token requests), so memory covers them all."""

    adapters: int
    completed: int
    errors: dict[str, int]
    wall_s: float


@dataclass
class HotSwap:
    server: str | None = None
    trials: list[HotSwapTrial] = field(default_factory=list)
    base_warm: FirstRequest | None = None
    cold_ttft_s_median: float | None = None
    warm_ttft_s_median: float | None = None
    cold_e2e_s_median: float | None = None
    warm_e2e_s_median: float | None = None
    server_adapter_load_s_mean: float | None = None
    touch_all: TouchAll | None = None
    merged_cold_start_s: list[float] = field(default_factory=list)


@dataclass
class PerTenant:
    rss: float
    uss: float


@dataclass
class SharedMemory:
    server: str
    before_adapters: Memory
    after_adapters: Memory
    adapters_loaded: int
    per_adapter_bytes: PerTenant


@dataclass
class MonolithicMemory:
    engines: int
    per_engine: list[Memory]
    available_bytes: int


@dataclass
class MemoryResults:
    adapter_file_bytes: int | None = None
    merged_file_bytes: int | None = None
    reference: Memory | None = None
    shared: SharedMemory | None = None
    monolithic: MonolithicMemory | None = None


@dataclass
class Goal:
    """One headline figure against its goal."""

    value: float
    goal: str
    met: bool
    adapters: int | None = None
    basis: str | None = None
    figures: dict[str, float] = field(default_factory=dict)  # the numbers behind the ratio


@dataclass
class Extrapolation:
    tenants: int
    shared_uss_bytes: float
    shared_basis: str  # measured / interpolated
    monolithic_uss_bytes: float
    monolithic_rss_bytes: float
    monolithic_basis: str  # measured / extrapolated


@dataclass
class Analysis:
    goals: dict[str, Goal] = field(default_factory=dict)
    base_output_throughput: float | None = None
    base_output_throughput_runs: list[float] = field(default_factory=list)
    throughput_by_adapters: dict[str, dict[int, float]] = field(default_factory=dict)
    # Ours with N adapters over our own base-only throughput (same run).
    paired_ratios: dict[str, dict[int, float]] = field(default_factory=dict)
    ttft_mean_ms_by_adapters: dict[str, dict[int, float]] = field(default_factory=dict)
    single_request_tok_s: dict[str, float] = field(default_factory=dict)
    roofline_achieved_gflops: float | None = None
    roofline_fraction: dict[str, float] = field(default_factory=dict)  # "dtype/threads" -> share
    noisy_runs: list[str] = field(default_factory=list)  # runs flagged as not quiet
    extrapolation: list[Extrapolation] = field(default_factory=list)
    monolithic_engines_that_fit: int | None = None
    monolithic_engines_that_fit_total_ram: int | None = None


@dataclass
class BenchResults:
    name: str
    started_utc: str
    machine: MachineInfo
    config: BenchConfig
    engines: dict[str, EngineRecord] = field(default_factory=dict)
    loads: list[LoadRun] = field(default_factory=list)
    hot_swap: HotSwap = field(default_factory=HotSwap)
    memory: MemoryResults = field(default_factory=MemoryResults)
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    finished_utc: str | None = None
    wall_s: float | None = None
    roofline: Roofline | None = None
    analysis: Analysis = field(default_factory=Analysis)

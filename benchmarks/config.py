"""The sizes of one serving-benchmark invocation, with the full and the quick (CI) presets."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class BenchConfig:
    """Sizes of one benchmark invocation (the defaults are the full run; see ``quick_preset``)."""

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

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
    concurrency: int = 32
    requests: int = 64
    duration: float = 600.0
    prompt_len: str = "64"
    max_tokens: int = 64
    rates: list[float] = field(default_factory=list)  # latency against Poisson load (optional)
    rate_requests: int = 20
    lora_ops_variants: list[bool | None] = field(default_factory=lambda: [None])
    # Every engine alike; None: tenantlora's own default for this machine (Settings).
    max_loras: int | None = None
    kv_cache_gib: float = 1.0  # every engine alike (vLLM kv_cache_memory_bytes)
    max_model_len: int = 1024
    # Every vLLM engine alike (ours and `vllm serve`); None: bfloat16 under a float32 model (the
    # benchmark's adapters are saved in bf16, so no bit is lost and each step reads half the
    # bytes per adapter), else the model's own (vLLM's "auto").
    lora_dtype: str | None = None
    merged_count: int = 3
    # Peers run in the same invocation: "vllm" (`vllm serve --enable-lora`, every N), "peft"
    # (transformers + PEFT at equal concurrency), "llamacpp" (llama.cpp's server, base only).
    peers: list[str] = field(default_factory=lambda: ["vllm", "peft", "llamacpp"])
    peft_adapters: int = 8
    peft_requests: int = 32
    peft_threads: int = 2
    # The adapter sweep (ours and `vllm serve` at every N) is repeated this many times,
    # interleaved; the report's figures and goals are the medians over the rounds.
    rounds: int = 3
    single_requests: int = 8  # one request alone: 48-word prompt, max_tokens, greedy
    single_prompt_words: int = 48
    llama_cpp_python: str | None = None  # a Python with llama_cpp[server]; None: look for one
    llamacpp_requests: int = 32
    hot_swap_trials: int = 3
    request_timeout: float = 600.0
    max_load: float = 1.5  # the invocation waits for the 1-minute load average to fall to this
    quiet_wait_s: float = 180.0  # wait up to this long for the machine to be quiet at start
    time_budget: float | None = None  # seconds; later LoRA-ops variants are skipped past it
    enforce_eager: bool = False  # every vLLM engine alike: skips torch.compile at start
    quick: bool = False
    name: str = "serving_benchmark"

    def engine_max_loras(self) -> int:
        """max_loras of every engine in the run (ours, vLLM's, the peers)."""
        if self.max_loras is not None:
            return self.max_loras
        from serving.settings import Settings

        return Settings().effective_max_loras(gpu=False)

    def engine_lora_dtype(self) -> str:
        """lora_dtype of every vLLM engine in the run (ours and `vllm serve`)."""
        if self.lora_dtype is not None:
            return self.lora_dtype
        from benchmarks.servers import bench_dtype

        return "bfloat16" if bench_dtype() == "float32" else "auto"

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
            peers=["vllm", "peft"],
            peft_adapters=4,
            peft_requests=3,
            single_requests=1,
            rounds=1,
            quiet_wait_s=0.0,
            hot_swap_trials=1,
            request_timeout=120.0,
            quick=True,
            enforce_eager=True,
            name="serving_benchmark_quick",
        )
        preset.update(kw)
        return cls(**preset)

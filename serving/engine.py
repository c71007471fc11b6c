"""The vLLM engine (its arguments, built in one place) and the adapter lifecycle around it.

vLLM keeps up to `max_loras` adapters on the device per batch and `max_cpu_loras` in host memory,
evicting the least recently used and reloading evicted ones on their next use by itself."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from adapters.validation import SUPPORTED_TARGET_MODULES
from serving.hardware import resolve_dtype
from serving.settings import Settings

log = logging.getLogger(__name__)


def on_gpu() -> bool:
    from vllm.platforms import current_platform

    return not current_platform.is_cpu()


def engine_kwargs(
    settings: Settings,
    model_path: Path | str,
    served_name: str | None = None,
    *,
    lora: bool = True,
    gpu: bool | None = None,
) -> dict[str, Any]:
    """The one set of vLLM engine arguments, from the settings. The same keys fit
    `AsyncEngineArgs(**kw)` (the server) and `vllm.LLM(**kw)` (evaluation, benchmarks)."""
    gpu = on_gpu() if gpu is None else gpu
    kwargs: dict[str, Any] = dict(
        model=str(model_path),
        tokenizer=str(model_path),
        dtype=resolve_dtype(settings.dtype, gpu),
        max_model_len=settings.max_model_len,
        gpu_memory_utilization=settings.effective_memory_share(gpu),
        kv_cache_memory_bytes=settings.kv_cache_bytes(gpu),
        max_num_seqs=settings.max_num_seqs,
        enforce_eager=settings.enforce_eager,
        disable_log_stats=False,
        # Fair sharing: admission sets each request's priority (serving/admission.py).
        scheduling_policy="priority",
    )
    if not gpu and not settings.cpu_worker_process:
        from serving.vllm_compat import in_process_executor

        kwargs["distributed_executor_backend"] = in_process_executor()
    if served_name:
        kwargs["served_model_name"] = [served_name]
    if settings.reasoning_parser:  # the engine needs it too (thinking budgets, structured output)
        kwargs["reasoning_parser"] = settings.reasoning_parser
    if lora:
        kwargs.update(
            enable_lora=True,
            max_loras=settings.effective_max_loras(gpu),
            max_cpu_loras=settings.adapter_cache_size(gpu),
            max_lora_rank=settings.max_lora_rank,
            lora_dtype=settings.lora_dtype,
            # Only the projections adapters may target (adapters.validation). vLLM's default
            # wraps lm_head and the embeddings too, and on the CPU its logits LoRA then gathers a
            # (vocab x rank) weight copy per sequence every step, for adapters that have none.
            lora_target_modules=sorted(SUPPORTED_TARGET_MODULES),
        )
    return kwargs


# vLLM reserves one core for its front end; below this many cores the engine gets them all.
SMALL_HOST_CORES = 4


def cpu_thread_binding(settings: Settings) -> str | None:
    """VLLM_CPU_OMP_THREADS_BIND for the engine (CPU ids it may use), or None for vLLM's own.

    vLLM's "auto" binding leaves one core to the API server and the scheduler: on a 2-core host
    that halves the engine (measured here: 217 -> 275 output tok/s base-only at concurrency 32,
    28 -> 31 tok/s for one request alone, with both cores)."""
    cores = sorted(os.sched_getaffinity(0))
    threads = settings.cpu_threads
    if threads is None and len(cores) > SMALL_HOST_CORES:
        return None
    chosen = cores[: threads or len(cores)]
    return ",".join(str(c) for c in chosen)


def apply_cpu_thread_binding(settings: Settings) -> None:
    """Set the binding in this process's environment (vLLM's engine processes inherit it), unless
    the operator set VLLM_CPU_OMP_THREADS_BIND already."""
    if "VLLM_CPU_OMP_THREADS_BIND" in os.environ or on_gpu():
        return
    binding = cpu_thread_binding(settings)
    if binding is not None:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = binding
        log.info("engine threads bound to CPUs %s", binding)


def build_engine_args(settings: Settings, model_path: Path, served_name: str):
    from vllm.engine.arg_utils import AsyncEngineArgs

    return AsyncEngineArgs(**engine_kwargs(settings, model_path, served_name))


def start_engine(settings: Settings, model_path: Path, served_name: str):
    """Build vLLM's AsyncLLM (starts the engine-core process; ~30 s on the CPU)."""
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.async_llm import AsyncLLM

    # The CPU LoRA-ops plugin reads this in every vLLM process (env is inherited by spawn).
    os.environ["TENANTLORA_CPU_LORA_OPS"] = "1" if settings.cpu_lora_ops else "0"
    apply_cpu_thread_binding(settings)
    args = build_engine_args(settings, model_path, served_name)
    log.info("engine dtype: %s (setting: %s)", args.dtype, settings.dtype)
    return AsyncLLM.from_engine_args(args, usage_context=UsageContext.OPENAI_API_SERVER)


class AdapterLifecycle:
    """Adapters in the engine: each is loaded explicitly on its first use by this process (so a
    broken one fails with a clear error before any generation, and the load is timed), requests
    in flight are counted per adapter, and a deleted adapter leaves the engine only after its
    last request. Which adapters are resident is vLLM's to say (`resident_count`): its LRU
    evicts and reloads them on its own."""

    def __init__(self, engine, on_load: Callable[[str, float], None] | None = None) -> None:
        self.engine = engine
        self._verified: set[int] = set()  # loaded once by this process: vLLM can load it
        self._in_flight: defaultdict[int, int] = defaultdict(int)
        self._idle: dict[int, asyncio.Event] = {}
        self._load_locks: defaultdict[int, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._on_load = on_load or (lambda _name, _s: None)

    async def ensure_loaded(self, lora_request) -> bool:
        """Load the adapter on its first use here; return True if this call loaded it."""
        lora_id = lora_request.lora_int_id
        if lora_id in self._verified:
            return False
        async with self._load_locks[lora_id]:
            if lora_id in self._verified:
                return False
            started = time.perf_counter()
            await self.engine.add_lora(lora_request)
            self._on_load(lora_request.lora_name, time.perf_counter() - started)
            self._verified.add(lora_id)
            self._load_locks.pop(lora_id, None)
            return True

    async def resident_count(self) -> int:
        """Adapters vLLM holds now (device slots and its host LRU cache)."""
        return len(await self.engine.list_loras())

    def acquire(self, lora_id: int) -> None:
        self._in_flight[lora_id] += 1
        self._idle.setdefault(lora_id, asyncio.Event()).clear()

    def release(self, lora_id: int) -> None:
        self._in_flight[lora_id] -= 1
        if self._in_flight[lora_id] <= 0:
            del self._in_flight[lora_id]
            self._idle.pop(lora_id, asyncio.Event()).set()

    def in_flight(self, lora_id: int) -> int:
        return self._in_flight.get(lora_id, 0)

    async def retire(self, lora_id: int, timeout: float = 600.0) -> None:
        """Wait for the adapter's in-flight requests to finish, then drop it from the engine."""
        event = self._idle.get(lora_id)
        if event is not None and self.in_flight(lora_id) > 0:
            try:
                await asyncio.wait_for(event.wait(), timeout)
            except TimeoutError:
                log.warning("adapter %s still busy after %.0f s; removing anyway", lora_id, timeout)
        self._verified.discard(lora_id)
        await self.engine.remove_lora(lora_id)

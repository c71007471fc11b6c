"""The vLLM engine and the adapter lifecycle around it.

vLLM keeps up to `max_loras` adapters on the device per batch and `max_cpu_loras` in host memory,
evicting the least recently used. We mirror that LRU order to know when a request is a cold start
(the adapter is loaded explicitly then, so its load time is measured and a broken adapter fails
before any generation), and count in-flight requests per adapter so a deleted adapter leaves the
engine only after its last request has finished."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import OrderedDict, defaultdict
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
    )
    if served_name:
        kwargs["served_model_name"] = [served_name]
    if lora:
        kwargs.update(
            enable_lora=True,
            max_loras=settings.max_loras,
            max_cpu_loras=max(settings.max_cpu_loras, settings.max_loras),
            max_lora_rank=settings.max_lora_rank,
            # Only the projections adapters may target (adapters.validation). vLLM's default
            # wraps lm_head and the embeddings too, and on the CPU its logits LoRA then gathers a
            # (vocab x rank) weight copy per sequence every step, for adapters that have none.
            lora_target_modules=sorted(SUPPORTED_TARGET_MODULES),
        )
    return kwargs


def build_engine_args(settings: Settings, model_path: Path, served_name: str):
    from vllm.engine.arg_utils import AsyncEngineArgs

    return AsyncEngineArgs(**engine_kwargs(settings, model_path, served_name))


def start_engine(settings: Settings, model_path: Path, served_name: str):
    """Build vLLM's AsyncLLM (starts the engine-core process; ~30 s on the CPU)."""
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.async_llm import AsyncLLM

    # The CPU LoRA-ops plugin reads this in every vLLM process (env is inherited by spawn).
    os.environ["TENANTLORA_CPU_LORA_OPS"] = "1" if settings.cpu_lora_ops else "0"
    args = build_engine_args(settings, model_path, served_name)
    log.info("engine dtype: %s (setting: %s)", args.dtype, settings.dtype)
    return AsyncLLM.from_engine_args(args, usage_context=UsageContext.OPENAI_API_SERVER)


class AdapterLifecycle:
    """Loads adapters on first use, tracks residency and in-flight requests, retires deleted ones.

    `on_load(seconds)` is called for every cold load; `on_resident(count)` whenever the number of
    adapters held by the engine changes."""

    def __init__(
        self,
        engine,
        capacity: int,
        on_load: Callable[[str, float], None] | None = None,
        on_resident: Callable[[int], None] | None = None,
    ) -> None:
        self.engine = engine
        self.capacity = capacity
        self._resident: OrderedDict[int, None] = OrderedDict()
        self._in_flight: defaultdict[int, int] = defaultdict(int)
        self._idle: dict[int, asyncio.Event] = {}
        self._load_locks: defaultdict[int, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._on_load = on_load or (lambda _name, _s: None)
        self._on_resident = on_resident or (lambda _n: None)

    async def ensure_loaded(self, lora_request) -> bool:
        """Load the adapter if it is not resident; return True if this was a cold load."""
        lora_id = lora_request.lora_int_id
        if lora_id in self._resident:
            self._resident.move_to_end(lora_id)
            return False
        async with self._load_locks[lora_id]:
            if lora_id in self._resident:
                self._resident.move_to_end(lora_id)
                return False
            started = time.perf_counter()
            await self.engine.add_lora(lora_request)
            self._on_load(lora_request.lora_name, time.perf_counter() - started)
            self._resident[lora_id] = None
            while len(self._resident) > self.capacity:
                self._resident.popitem(last=False)  # vLLM's LRU evicts the same one
            self._on_resident(len(self._resident))
            return True

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
        await self.engine.remove_lora(lora_id)
        if self._resident.pop(lora_id, "absent") != "absent":
            self._on_resident(len(self._resident))

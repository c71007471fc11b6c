"""(tenant, model) -> what the engine runs: the one tenant-aware resolver, shared by the FastAPI
app and the Ray gateway.

Lookups go to the registry in a worker thread (never on the event loop) and are cached per
(tenant, model). The cache is dropped whenever this process writes to the registry (its
`generation` changes) and otherwise lives `ttl` seconds, which bounds how stale a write made by
another replica can be."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import anyio.to_thread

from adapters.catalog import AdapterCatalog
from adapters.names import is_valid_name
from adapters.registry import AdapterVersion, Tenant

# `name` or `name@N`; N in plain ASCII digits and small enough for any database integer.
_PINNED = re.compile(r"^(?P<name>.+)@(?P<version>[0-9]{1,9})$")
_CACHE_LIMIT = 10_000


@dataclass(frozen=True)
class ResolvedModel:
    """The model a request asked for, as its tenant sees it, and the adapter to run (if any)."""

    public_name: str
    adapter: AdapterVersion | None
    metrics_label: str

    @property
    def lora_int_id(self) -> int | None:
        return self.adapter.id if self.adapter else None

    def lora_request(self):
        """vLLM's LoRARequest for the adapter: engine name `tenant/name@v`, stable row id."""
        if self.adapter is None:
            return None

        return lora_request_for(self.adapter)


def lora_request_for(version: AdapterVersion):
    from vllm.lora.request import LoRARequest

    return LoRARequest(version.engine_name, version.id, version.path)


def parse_model_name(model: str) -> tuple[str, int | None] | None:
    """`name` -> (name, None), `name@3` -> (name, 3); None when it cannot name any adapter."""
    match = _PINNED.match(model)
    name, version = (match["name"], int(match["version"])) if match else (model, None)
    return (name, version) if is_valid_name(name) else None


class TenantResolver:
    def __init__(self, catalog: AdapterCatalog, base_name: str, ttl: float = 2.0) -> None:
        self.catalog = catalog
        self.base_name = base_name
        self.ttl = ttl
        self._cache: dict[tuple[int, str], tuple[float, AdapterVersion | None]] = {}
        self._generation = catalog.registry.generation

    def invalidate(self) -> None:
        self._cache.clear()

    async def resolve(self, tenant: Tenant, model: str | None) -> ResolvedModel | None:
        """The model `model` means for `tenant`, or None: unknown and another tenant's adapters
        are the same None."""
        if not model or model == self.base_name:
            return ResolvedModel(self.base_name, None, "base")
        adapter = await self.find_adapter(tenant, model)
        if adapter is None:
            return None
        own = adapter.tenant_id == tenant.id
        return ResolvedModel(model, adapter, adapter.pinned_name if own else adapter.engine_name)

    async def find_adapter(self, tenant: Tenant, model: str) -> AdapterVersion | None:
        parsed = parse_model_name(model)
        if parsed is None:
            return None
        generation = self.catalog.registry.generation
        if generation != self._generation:
            self._cache.clear()
            self._generation = generation
        key = (tenant.id, model)
        now = time.monotonic()
        hit = self._cache.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
        found = await anyio.to_thread.run_sync(self.catalog.resolve_parsed, tenant, *parsed)
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[key] = (now + self.ttl, found)
        return found

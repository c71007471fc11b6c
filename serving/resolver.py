"""(tenant, model) -> what the engine runs: the one tenant-aware resolver, shared by the FastAPI
app and the Ray gateway.

Lookups go through a `LookupCache` keyed by (tenant, model): a worker thread on a miss, dropped
on any registry write in this process, at most `ttl` seconds stale for another replica's write."""

from __future__ import annotations

import re
from dataclasses import dataclass

from adapters.catalog import AdapterCatalog
from adapters.names import is_valid_name
from adapters.registry import AdapterVersion, Tenant
from serving.lookup_cache import LookupCache

# `name` or `name@N`; N in plain ASCII digits and small enough for any database integer.
_PINNED = re.compile(r"^(?P<name>.+)@(?P<version>[0-9]{1,9})$")


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
        self._cache: LookupCache[AdapterVersion | None] = LookupCache(catalog.registry, ttl)

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
        return await self._cache.get(
            (tenant.id, model), lambda: self.catalog.resolve_parsed(tenant, *parsed)
        )

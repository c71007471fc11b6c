"""What the running server holds: built once at start-up (serving.app), reached from every
route. Each piece has one owner: the registry owns tenants, keys and adapters; vLLM owns which
adapters are resident; `AdapterLifecycle` owns in-flight counts; the admission controller owns
concurrency slots and rate counters; the caches here only shorten lookups."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import anyio.to_thread
from fastapi import Request

from adapters.catalog import AdapterCatalog
from adapters.registry import Tenant
from adapters.service import AdapterService
from serving.cache_salt import CacheSalts
from serving.engine import AdapterLifecycle
from serving.lease import RequestLease
from serving.settings import Settings

if TYPE_CHECKING:
    from serving.auth import Authenticator
    from serving.resolver import TenantResolver

T = TypeVar("T")


@dataclass
class ServerState:
    settings: Settings
    base_name: str
    adapters: AdapterService
    catalog: AdapterCatalog
    auth: Authenticator
    resolver: TenantResolver
    engine: Any  # ObservedEngine around vLLM's AsyncLLM
    lifecycle: AdapterLifecycle
    serving_models: Any
    serving_chat: Any
    serving_completion: Any
    serving_tokenization: Any  # vLLM's /tokenize and /detokenize, sharing the chat renderer
    started_at: float
    cache_salts: CacheSalts = field(default_factory=CacheSalts)
    admission: Any = None  # serving.admission.Admission, when limits are on
    usage: Any = None  # adapters.usage.UsageLedger, when the ledger is on

    def invalidate_caches(self) -> None:
        """Forget cached keys, tenants and adapter names after a write in this process
        (revoked keys and deleted tenants stop working at once). Registry writes made through
        `adapters.registry.Registry` in this process already do this by themselves."""
        self.auth.invalidate()
        self.resolver.invalidate()

    async def run_sync(self, func: Callable[..., T], *args: Any) -> T:
        """Run a blocking call (a registry query) in a worker thread, off the event loop."""
        return await anyio.to_thread.run_sync(func, *args)

    def new_lease(self, tenant: Tenant, route: str) -> RequestLease:
        lease = RequestLease(tenant, route)
        if self.usage is not None:
            lease.on_release(self._record_usage)
        return lease

    async def admit(self, lease: RequestLease, request: Any) -> None:
        """Wait for the tenant's turn (or raise its 429); the ticket goes back with the lease."""
        if self.admission is None:
            return
        ticket = await self.admission.admit(lease.tenant, request)
        lease.ticket = ticket
        lease.on_release(_settle_and_release)
        if getattr(ticket, "priority", None) is not None:
            request.priority = ticket.priority

    def _record_usage(self, lease: RequestLease, status: int) -> None:
        if lease.prompt_tokens or lease.completion_tokens or status < 400:
            adapter = lease.resolved.adapter if lease.resolved else None
            self.usage.record(
                lease.tenant.id,
                adapter.id if adapter else None,
                lease.prompt_tokens,
                lease.completion_tokens,
            )


def _settle_and_release(lease: RequestLease, _status: int) -> None:
    lease.ticket.settle(lease.prompt_tokens, lease.completion_tokens)
    lease.ticket.release()


def server_state(request: Request) -> ServerState:
    return request.app.state.tenantlora

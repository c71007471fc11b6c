"""What the running server holds: built once at start-up, reached from every route."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from adapters.catalog import AdapterCatalog
from adapters.service import AdapterService
from serving.engine import AdapterLifecycle
from serving.settings import Settings


@dataclass
class ServerState:
    settings: Settings
    base_name: str
    base_path: str
    adapters: AdapterService
    catalog: AdapterCatalog
    engine: object  # ObservedEngine around vLLM's AsyncLLM
    lifecycle: AdapterLifecycle
    serving_models: object
    serving_chat: object
    serving_completion: object
    started_at: float

    def invalidate_caches(self) -> None:
        """Forget cached keys, tenants and adapter names after a write in this process
        (revoked keys and deleted tenants stop working at once)."""


def server_state(request: Request) -> ServerState:
    return request.app.state.tenantlora

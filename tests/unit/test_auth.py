"""Authentication and the write guard, without an engine: keys, the admin, anonymous callers,
the lookup cache (dropped on registry writes), and single-user servers without uploads."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from fastapi import Depends, FastAPI

from adapters.registry import Tenant
from serving.auth import Authenticator, Caller, require_writer
from serving.errors import APIError, install_error_handlers
from serving.settings import Settings

PUBLIC = Tenant(id=1, name="public", max_adapters=5, max_bytes=10, created_at=0.0)
ACME = Tenant(id=2, name="acme", max_adapters=5, max_bytes=10, created_at=0.0)


class CountingRegistry:
    def __init__(self) -> None:
        self.generation = 0
        self.lookups = 0
        self.keys = {"tl-acme": ACME}

    def tenant_by_key(self, key: str):
        self.lookups += 1
        return self.keys.get(key)


def auth(registry, requires_auth: bool = True) -> Authenticator:
    return Authenticator(
        registry, PUBLIC, admin_key="admin-secret", requires_auth=requires_auth, ttl=60
    )


def test_keys_admin_and_anonymous():
    a = auth(CountingRegistry())
    assert asyncio.run(a.authenticate("tl-acme")) == Caller(ACME)
    assert asyncio.run(a.authenticate("admin-secret")) == Caller(PUBLIC, is_admin=True)
    for key, code in ((None, "missing_api_key"), ("tl-nope", "invalid_api_key")):
        with pytest.raises(APIError) as exc:
            asyncio.run(a.authenticate(key))
        assert (exc.value.status, exc.value.code) == (401, code)
    open_auth = auth(CountingRegistry(), requires_auth=False)
    assert asyncio.run(open_auth.authenticate(None)) == Caller(PUBLIC, anonymous=True)
    assert asyncio.run(open_auth.authenticate("tl-nope")).anonymous


def test_cache_is_dropped_on_registry_writes():
    registry = CountingRegistry()
    a = auth(registry)

    async def twice() -> None:
        await a.authenticate("tl-acme")
        await a.authenticate("tl-acme")

    asyncio.run(twice())
    assert registry.lookups == 1  # the second came from the cache
    del registry.keys["tl-acme"]  # the key is revoked in this process...
    registry.generation += 1  # ...by a write transaction
    with pytest.raises(APIError):
        asyncio.run(a.authenticate("tl-acme"))


def test_made_up_keys_do_not_grow_the_cache():
    a = auth(CountingRegistry(), requires_auth=False)

    async def flood() -> None:
        for i in range(12_000):
            await a.tenant_for_key(f"tl-{i}")

    asyncio.run(flood())
    assert len(a._cache) <= 10_000


@pytest.mark.parametrize(
    ("admin_key", "caller", "status", "code"),
    [
        (None, Caller(ACME), 403, "uploads_disabled"),
        ("admin-secret", Caller(PUBLIC, anonymous=True), 403, "tenant_key_required"),
        ("admin-secret", Caller(ACME), 200, None),
    ],
)
def test_writes_need_a_tenant_key_and_an_admin_configured_server(admin_key, caller, status, code):
    from serving.auth import current_caller
    from serving.state import server_state

    class State:
        settings = Settings(admin_key=admin_key)

    app = FastAPI()
    install_error_handlers(app)

    @app.post("/write", dependencies=[Depends(require_writer)])
    async def write() -> dict:
        return {"ok": True}

    app.dependency_overrides[current_caller] = lambda: caller
    app.dependency_overrides[server_state] = lambda: State()

    async def call() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.post("/write")

    response = asyncio.run(call())
    assert response.status_code == status
    if code:
        assert response.json()["error"]["code"] == code

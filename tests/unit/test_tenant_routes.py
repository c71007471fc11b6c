"""Tenant, key and usage routes without an engine: the real routes, auth, registry (SQLite) and
store; only vLLM's engine is a small fake that records which adapters it was told to drop.

Each refusal is checked for its status, OpenAI error shape, code and param; the end-to-end test
(tests/e2e/test_tenant_lifecycle.py) covers the same behaviours against the real server."""

from __future__ import annotations

import time
from datetime import date

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from adapters.catalog import AdapterCatalog
from adapters.registry import Registry
from adapters.service import AdapterService
from adapters.store import AdapterStore
from adapters.usage import UsageLedger
from serving.auth import Authenticator
from serving.engine import AdapterLifecycle
from serving.errors import install_error_handlers
from serving.resolver import TenantResolver
from serving.settings import Settings
from serving.state import ServerState
from serving.tenant_routes import router

ADMIN = "admin-key-for-tests"


class EngineStub:
    def __init__(self) -> None:
        self.removed: list[int] = []

    async def remove_lora(self, lora_id: int) -> bool:
        self.removed.append(lora_id)
        return True


@pytest.fixture()
def server(tmp_path):
    registry = Registry(tmp_path / "registry.db")
    catalog = AdapterCatalog(registry)
    engine = EngineStub()
    state = ServerState(
        settings=Settings(admin_key=ADMIN, tenant_max_keys=3, data_dir=tmp_path),
        base_name="base-model",
        # The routes here never validate an adapter, so no base model is needed.
        adapters=AdapterService(
            registry, AdapterStore(tmp_path / "store"), None, max_rank=16, max_bytes=10**9
        ),  # type: ignore[arg-type]
        catalog=catalog,
        auth=Authenticator(registry, catalog.public, admin_key=ADMIN, requires_auth=True),
        resolver=TenantResolver(catalog, "base-model"),
        engine=engine,
        lifecycle=AdapterLifecycle(engine),
        serving_models=None,
        serving_chat=None,
        serving_completion=None,
        serving_tokenization=None,
        started_at=time.time(),
        usage=UsageLedger(registry, interval=3600),
    )
    app = FastAPI()
    app.state.tenantlora = state
    app.state.args = None
    install_error_handlers(app)
    app.include_router(router)
    with TestClient(app) as client:
        client.state = state
        client.engine = engine
        yield client
    registry.close()


def _auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def _create(client, name: str, **fields) -> tuple[dict, str]:
    r = client.post("/v1/tenants", json={"name": name, **fields}, headers=_auth(ADMIN))
    assert r.status_code == 201, r.text
    body = r.json()
    return body, body["api_key"]


def _error(response, status: int, code: str, param: str | None = "__any__") -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code, error
    if param != "__any__":
        assert error["param"] == param, error
    return error


BAD_PATCHES = [
    ({"max_concurrent": -1}, "invalid_value", "max_concurrent"),
    ({"max_concurrent": 0}, "invalid_value", "max_concurrent"),
    ({"requests_per_minute": "60"}, "invalid_value", "requests_per_minute"),
    ({"tokens_per_minute": 1.5}, "invalid_value", "tokens_per_minute"),
    ({"max_n": True}, "invalid_value", "max_n"),
    ({"max_prompts": 2**60}, "invalid_value", "max_prompts"),
    ({"weight": 0}, "invalid_value", "weight"),
    ({"weight": "1"}, "invalid_value", "weight"),
    ({"max_adapters": None}, "invalid_value", "max_adapters"),
    ({"max_bytes": 0}, "invalid_value", "max_bytes"),
    ({"max_concurency": 2}, "unknown_field", "max_concurency"),
    ({"name": "renamed"}, "unknown_field", "name"),
]


def test_patch_refuses_bad_values_with_400(server):
    _create(server, "acme")
    for body, code, param in BAD_PATCHES:
        r = server.patch("/v1/tenants/acme", json=body, headers=_auth(ADMIN))
        _error(r, 400, code, param)
    # Python's json module reads NaN and Infinity; the limit check refuses them
    for raw in (b'{"weight": NaN}', b'{"weight": Infinity}', b'{"max_n": NaN}'):
        r = server.patch("/v1/tenants/acme", content=raw, headers=_auth(ADMIN))
        _error(r, 400, "invalid_value")
    for raw in (b"[1, 2]", b"{oops", b'"text"'):
        r = server.patch("/v1/tenants/acme", content=raw, headers=_auth(ADMIN))
        _error(r, 400, "invalid_json")
    unchanged = server.get("/v1/tenants/acme", headers=_auth(ADMIN)).json()
    assert unchanged["max_concurrent"] is None and unchanged["weight"] is None


def test_create_update_show_and_reset_limits(server):
    created, _ = _create(server, "acme", max_concurrent=2, tokens_per_minute=1000, weight=2)
    assert (created["max_concurrent"], created["tokens_per_minute"], created["weight"]) == (
        2,
        1000,
        2.0,
    )
    assert created["max_adapters"] == Settings().tenant_max_adapters
    _error(
        server.post("/v1/tenants", json={"name": "x", "max_n": 0}, headers=_auth(ADMIN)),
        400,
        "invalid_value",
        "max_n",
    )
    r = server.patch(
        "/v1/tenants/acme",
        json={"max_n": 3, "weight": None, "max_bytes": 12345},
        headers=_auth(ADMIN),
    )
    assert r.status_code == 200, r.text
    shown = server.get("/v1/tenants/acme", headers=_auth(ADMIN)).json()
    assert (shown["max_n"], shown["weight"], shown["max_bytes"]) == (3, None, 12345)
    assert shown["max_concurrent"] == 2  # left out: unchanged
    assert "api_key" not in shown
    listed = server.get("/v1/tenants", headers=_auth(ADMIN)).json()["data"]
    assert [t["name"] for t in listed] == ["public", "acme"]
    _error(server.get("/v1/tenants/nobody", headers=_auth(ADMIN)), 404, "tenant_not_found")
    _error(
        server.patch("/v1/tenants/nobody", json={"max_n": 1}, headers=_auth(ADMIN)),
        404,
        "tenant_not_found",
    )


def test_tenant_routes_need_the_admin(server):
    _, key = _create(server, "acme")
    for method, path in [
        ("GET", "/v1/tenants/acme"),
        ("PATCH", "/v1/tenants/acme"),
        ("DELETE", "/v1/tenants/acme"),
        ("GET", "/v1/tenants/acme/keys"),
        ("POST", "/v1/tenants/acme/keys"),
    ]:
        _error(server.request(method, path, headers=_auth(key), json={}), 403, "admin_required")
        _error(server.request(method, path, json={}), 401, "missing_api_key")


def test_keys_several_revoke_rotate_and_expiry_checks(server):
    _, first = _create(server, "acme")
    _, other = _create(server, "globex")
    made = server.post(
        "/v1/tenants/acme/keys", json={"name": "rotated", "expires_in_seconds": 3600},
        headers=_auth(ADMIN),
    )  # fmt: skip
    assert made.status_code == 201, made.text
    second = made.json()["api_key"]
    assert made.json()["prefix"] == second[:8] and made.json()["expires_at"] > time.time()
    assert server.get("/v1/keys", headers=_auth(second)).status_code == 200  # works at once

    listed = server.get("/v1/tenants/acme/keys", headers=_auth(ADMIN)).json()["data"]
    assert [k["name"] for k in listed] == ["initial key", "rotated"]
    text = repr(listed)
    assert first not in text and second not in text and "hash" not in text

    # a tenant sees and revokes only its own keys
    own = server.get("/v1/keys", headers=_auth(other)).json()["data"]
    assert [k["id"] for k in own] != [k["id"] for k in listed] and len(own) == 1
    _error(server.delete(f"/v1/keys/{listed[0]['id']}", headers=_auth(other)), 404, "key_not_found")
    _error(server.delete("/v1/keys/not-a-number", headers=_auth(other)), 404, "key_not_found")
    _error(server.get("/v1/keys", headers=_auth(ADMIN)), 403, "tenant_key_required")

    # rotation: the old key works until revoked, then 401 at once
    assert server.get("/v1/keys", headers=_auth(first)).status_code == 200
    revoked = server.delete(f"/v1/keys/{listed[0]['id']}", headers=_auth(second))
    assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
    _error(server.get("/v1/keys", headers=_auth(first)), 401, "invalid_api_key")
    assert server.get("/v1/keys", headers=_auth(second)).status_code == 200

    own_new = server.post("/v1/keys", json={"expires_at": time.time() + 60}, headers=_auth(second))
    assert own_new.status_code == 201 and own_new.json()["api_key"].startswith("tl-")
    for body, param in [
        ({"expires_in_seconds": 0}, "expires_in_seconds"),
        ({"expires_at": time.time() - 5}, "expires_at"),
        ({"expires_at": 1e300}, "expires_at"),
        ({"expires_in_seconds": 5, "expires_at": time.time() + 60}, None),
        ({"name": ""}, "name"),
        ({"label": "x"}, "label"),
    ]:
        r = server.post("/v1/tenants/acme/keys", json=body, headers=_auth(ADMIN))
        _error(r, 400, "unknown_field" if param == "label" else "invalid_value", param)
    # three usable keys at most (tenant_max_keys=3): second, own_new and one more
    assert server.post("/v1/keys", headers=_auth(second)).status_code == 201
    _error(server.post("/v1/keys", headers=_auth(second)), 403, "quota_exceeded")


def test_expired_key_is_refused(server):
    _create(server, "acme")
    r = server.post("/v1/tenants/acme/keys", json={"expires_in_seconds": 1}, headers=_auth(ADMIN))
    key = r.json()["api_key"]
    assert server.get("/v1/keys", headers=_auth(key)).status_code == 200
    time.sleep(1.2)
    server.state.invalidate_caches()  # the key cache holds a lookup up to 2 s
    _error(server.get("/v1/keys", headers=_auth(key)), 401, "invalid_api_key")


def test_delete_tenant(server, tmp_path):
    registry = server.state.adapters.registry
    _, key = _create(server, "acme")
    acme = registry.tenant_by_name("acme")
    store = server.state.adapters.store
    for digest in ("d1", "d2"):
        (store.path_for(digest)).mkdir(parents=True)
    version = registry.add_version(
        acme, "x", digest="d1", path=str(store.path_for("d1")), size_bytes=1, rank=8,
        alpha=16.0, target_modules=("q_proj",), base_model="b", source="upload",
    )  # fmt: skip
    _error(server.delete("/v1/tenants/public", headers=_auth(ADMIN)), 400, "public_tenant")
    r = server.delete("/v1/tenants/acme", headers=_auth(ADMIN))
    assert r.status_code == 200 and r.json()["adapters"] == ["x@1"]
    _error(server.get("/v1/keys", headers=_auth(key)), 401, "invalid_api_key")
    _error(server.get("/v1/tenants/acme", headers=_auth(ADMIN)), 404, "tenant_not_found")
    _error(server.delete("/v1/tenants/acme", headers=_auth(ADMIN)), 404, "tenant_not_found")
    r = server.post("/v1/tenants", json={"name": "acme"}, headers=_auth(ADMIN))
    _error(r, 409, "conflict")
    deadline = time.monotonic() + 5
    while store.path_for("d1").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.engine.removed == [version.id]
    assert not store.path_for("d1").exists() and store.path_for("d2").exists()


def test_usage_route(server):
    _, acme_key = _create(server, "acme")
    _, globex_key = _create(server, "globex")
    registry = server.state.adapters.registry
    acme, globex = registry.tenant_by_name("acme"), registry.tenant_by_name("globex")
    version = registry.add_version(
        acme, "support", digest="d", path="/d", size_bytes=1, rank=8, alpha=16.0,
        target_modules=("q_proj",), base_model="b", source="upload",
    )  # fmt: skip
    ledger = server.state.usage
    ledger.record(acme.id, version.id, 10, 4)
    ledger.record(acme.id, None, 3, 2)
    ledger.record(globex.id, None, 1, 1)  # still buffered: the route flushes it first
    today = date.today().isoformat()

    mine = server.get("/v1/usage", headers=_auth(acme_key)).json()
    assert {(r["tenant"], r["model"], r["requests"], r["total_tokens"]) for r in mine["data"]} == {
        ("acme", "support@1", 1, 14),
        ("acme", "base-model", 1, 5),
    }
    _error(server.get("/v1/usage?tenant=globex", headers=_auth(acme_key)), 403, "admin_required")
    everyone = server.get(f"/v1/usage?start={today}&end={today}", headers=_auth(ADMIN)).json()
    assert {r["tenant"] for r in everyone["data"]} == {"acme", "globex"}
    one = server.get("/v1/usage?tenant=globex", headers=_auth(ADMIN)).json()["data"]
    assert [(r["tenant"], r["requests"]) for r in one] == [("globex", 1)]
    _error(server.get("/v1/usage?tenant=nobody", headers=_auth(ADMIN)), 404, "tenant_not_found")
    for query, param in [
        ("start=2024-13-01", "start"),
        ("end=yesterday", "end"),
        ("start=20240101", "start"),
        ("start=2024-01-01T00:00", "start"),
        ("start=2024-02-02&end=2024-02-01", "start"),
        ("start=2020-01-01&end=2024-01-01", "start"),
    ]:
        _error(
            server.get(f"/v1/usage?{query}", headers=_auth(globex_key)), 400, "invalid_date", param
        )
    old = server.get("/v1/usage?start=2001-01-01&end=2001-01-31", headers=_auth(ADMIN)).json()
    assert old["data"] == [] and (old["start"], old["end"]) == ("2001-01-01", "2001-01-31")

"""Registry: several keys per tenant (revoke, expiry), tenant updates and deletion, the schema
migration of older databases, and the usage ledger; on SQLite and PostgreSQL alike."""

from __future__ import annotations

import sqlite3
import time
from datetime import date, timedelta

import pytest
from test_registry import (  # noqa: F401 - the shared SQLite/PostgreSQL fixtures
    _add,
    postgres_schema_url,
    registry_url,
)

from adapters.errors import Conflict, NotFound, QuotaExceeded
from adapters.keys import hash_key
from adapters.registry import POSTGRES_SCHEMA, SQLITE_SCHEMA, TENANT_LIMITS, Registry
from adapters.usage import UsageLedger


@pytest.fixture()
def registry(registry_url):  # noqa: F811
    reg = Registry(registry_url)
    reg.ensure_public_tenant()
    yield reg
    reg.close()


def test_several_keys_revoke_and_expiry(registry):
    acme, first = registry.create_tenant("acme", max_adapters=5, max_bytes=10**9)
    globex, other = registry.create_tenant("globex", max_adapters=5, max_bytes=10**9)
    second_key, second = registry.create_key(acme, name="ci")
    expired_key, expired = registry.create_key(acme, expires_at=time.time() - 1)
    assert registry.tenant_by_key(first) == acme
    assert registry.tenant_by_key(second) == acme
    assert registry.tenant_by_key(expired) is None
    assert registry.tenant_by_key(other) == globex

    listed = registry.list_keys(acme)
    assert [k.id for k in listed] == sorted(k.id for k in listed)
    assert {k.prefix for k in listed} == {first[:8], second[:8], expired[:8]}
    shown = repr([k.public_dict(time.time()) for k in listed])
    for key in (first, second, expired):
        assert key not in shown and hash_key(key) not in shown
    assert [k.name for k in listed] == ["initial key", "ci", None]
    assert [k.is_active(time.time()) for k in listed] == [True, True, False]
    assert globex.id not in {k.tenant_id for k in listed}

    with pytest.raises(NotFound):  # another tenant's key id is not found
        registry.revoke_key(globex, second_key.id)
    assert registry.tenant_by_key(second) == acme
    revoked = registry.revoke_key(acme, second_key.id)
    assert revoked.revoked_at is not None
    assert registry.tenant_by_key(second) is None
    assert registry.tenant_by_key(first) == acme  # rotation: the others keep working
    assert registry.revoke_key(acme, second_key.id).revoked_at == revoked.revoked_at
    assert registry.list_keys(acme)[0].last_used_at is not None  # first was used above
    assert expired_key.expires_at < time.time()


def test_active_key_limit(registry):
    acme, _ = registry.create_tenant("acme", max_adapters=5, max_bytes=10**9)
    registry.create_key(acme, expires_at=time.time() - 1)  # expired ones do not count
    extra, _ = registry.create_key(acme, max_active=2)
    with pytest.raises(QuotaExceeded):
        registry.create_key(acme, max_active=2)
    registry.revoke_key(acme, extra.id)
    registry.create_key(acme, max_active=2)


def test_limits_are_stored_updated_and_reset(registry, registry_url):  # noqa: F811
    acme, key = registry.create_tenant(
        "acme", max_adapters=5, max_bytes=10**9, max_concurrent=2, weight=0.5
    )
    assert (acme.max_concurrent, acme.weight, acme.max_n) == (2, 0.5, None)
    updated = registry.update_tenant(
        acme, max_n=4, requests_per_minute=60, weight=None, max_adapters=1
    )
    assert (updated.max_n, updated.requests_per_minute, updated.weight) == (4, 60, None)
    assert (updated.max_concurrent, updated.max_adapters) == (2, 1)
    with pytest.raises(ValueError, match="unknown tenant limits"):
        registry.update_tenant(acme, name="evil")
    with pytest.raises(ValueError, match="unknown tenant limits"):
        registry.create_tenant("x", max_adapters=1, max_bytes=1, bogus=1)
    registry.close()
    reopened = Registry(registry_url)
    try:
        again = reopened.tenant_by_key(key)
        assert again == updated
        assert {f: getattr(again, f) for f in TENANT_LIMITS} == {
            "max_concurrent": 2,
            "requests_per_minute": 60,
            "tokens_per_minute": None,
            "max_n": 4,
            "max_prompts": None,
            "weight": None,
        }
    finally:
        reopened.close()


def test_tenant_deletion(registry):
    acme, key = registry.create_tenant("acme", max_adapters=5, max_bytes=10**9)
    _, spare = registry.create_key(acme)
    live = [_add(registry, acme, "x", "d1"), _add(registry, acme, "y", "d2")]
    registry.delete(acme, "y")
    globex, _ = registry.create_tenant("globex", max_adapters=5, max_bytes=10**9)
    _add(registry, globex, "x", "d1")

    removed = registry.delete_tenant(acme)
    assert [v.id for v in removed] == [live[0].id]  # only the live ones are returned
    assert registry.tenant_by_key(key) is None and registry.tenant_by_key(spare) is None
    assert all(k.revoked_at is not None for k in registry.list_keys(acme))
    assert registry.find_live(acme, "x") is None
    assert registry.digest_in_use("d1")  # globex holds the same content
    assert not registry.digest_in_use("d2")
    assert "acme" not in [t.name for t in registry.list_tenants()]
    assert registry.tenant_by_name("acme") is None
    assert registry.tenant_by_name("acme", include_deleted=True).deleted_at is not None
    with pytest.raises(Conflict, match="names are not reused"):
        registry.create_tenant("acme", max_adapters=5, max_bytes=10**9)
    with pytest.raises(NotFound):
        registry.delete_tenant(acme)
    with pytest.raises(NotFound):
        _add(registry, acme, "late", "d3")  # an upload that was running during the delete
    with pytest.raises(NotFound):
        registry.create_key(acme)
    with pytest.raises(NotFound):
        registry.update_tenant(acme, max_n=1)
    with pytest.raises(Conflict):
        registry.delete_tenant(registry.ensure_public_tenant())


def _old_database(url: str) -> None:
    """A registry as the first release wrote it: one key hash per tenant, no newer columns."""
    row = ("old", hash_key("tl-old-key"), 3, 1000, 1.0)
    insert = "INSERT INTO tenants (name, key_hash, max_adapters, max_bytes, created_at) VALUES "
    if url.startswith("postgresql://"):
        import psycopg

        with psycopg.connect(url, autocommit=True) as conn:
            for statement in POSTGRES_SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(insert + "(%s, %s, %s, %s, %s)", row)
        return
    with sqlite3.connect(url) as conn:
        conn.executescript(SQLITE_SCHEMA)
        conn.execute(insert + "(?, ?, ?, ?, ?)", row)


def test_old_database_is_migrated(registry_url):  # noqa: F811
    _old_database(registry_url)
    for _ in range(2):  # the migration runs at every start and changes nothing the second time
        registry = Registry(registry_url)
        try:
            tenant = registry.tenant_by_key("tl-old-key")
            assert tenant is not None and tenant.name == "old"
            assert tenant.max_concurrent is None and tenant.deleted_at is None
            keys = registry.list_keys(tenant)
            assert [(k.name, k.prefix) for k in keys] == [("initial key", "")]
        finally:
            registry.close()
    registry = Registry(registry_url)
    try:
        tenant = registry.tenant_by_name("old")
        registry.revoke_key(tenant, registry.list_keys(tenant)[0].id)
        registry.close()
        registry = Registry(registry_url)  # a revoked migrated key is not copied back
        assert registry.tenant_by_key("tl-old-key") is None
    finally:
        registry.close()


def test_usage_ledger_counts_and_survives_reopen(registry, registry_url):  # noqa: F811
    acme, _ = registry.create_tenant("acme", max_adapters=5, max_bytes=10**9)
    globex, _ = registry.create_tenant("globex", max_adapters=5, max_bytes=10**9)
    version = _add(registry, acme, "support", "d1")
    day = date(2030, 5, 17)
    ledger = UsageLedger(registry, interval=3600, today=lambda: day)
    ledger.record(acme.id, version.id, 10, 5)
    ledger.record(acme.id, version.id, 7, 3)
    ledger.record(acme.id, None, 4, 2)
    ledger.record(globex.id, None, 1, 1)
    assert ledger.pending() == 3
    ledger.flush()
    assert ledger.pending() == 0
    ledger.record(acme.id, version.id, 1, 1)  # added onto the stored row
    ledger.close()

    registry.close()
    reopened = Registry(registry_url)
    try:
        rows = reopened.usage(acme.id, day, day)
        assert [(r.adapter, r.requests, r.prompt_tokens, r.completion_tokens) for r in rows] == [
            (None, 1, 4, 2),
            ("support@1", 3, 18, 9),
        ]
        assert {r.tenant_name for r in rows} == {"acme"}
        everyone = reopened.usage(None, day, day)
        assert {(r.tenant_name, r.requests) for r in everyone} == {
            ("acme", 1),
            ("acme", 3),
            ("globex", 1),
        }
        assert reopened.usage(None, day + timedelta(days=1), day + timedelta(days=9)) == []
        assert len(reopened.usage(None, day - timedelta(days=1), day)) == 3
    finally:
        reopened.close()


def test_ledger_keeps_counts_when_the_database_write_fails(registry):
    acme, _ = registry.create_tenant("acme", max_adapters=5, max_bytes=10**9)
    day = date(2030, 1, 1)
    ledger = UsageLedger(registry, interval=3600, today=lambda: day)
    ledger.record(acme.id, None, 3, 4)
    real = registry.add_usage

    def failing(_counts):
        raise RuntimeError("database down")

    registry.add_usage = failing
    with pytest.raises(RuntimeError):
        ledger.flush()
    ledger.record(acme.id, None, 1, 1)
    registry.add_usage = real
    ledger.flush()
    [row] = registry.usage(acme.id, day, day)
    assert (row.requests, row.prompt_tokens, row.completion_tokens) == (2, 4, 5)


def test_ledger_background_thread_flushes(registry):
    acme, _ = registry.create_tenant("acme", max_adapters=5, max_bytes=10**9)
    ledger = UsageLedger(registry, interval=0.05)
    ledger.start()
    try:
        ledger.record(acme.id, None, 2, 3)
        deadline = time.monotonic() + 10
        while ledger.pending() and time.monotonic() < deadline:
            time.sleep(0.02)
        today = date.today()
        rows = registry.usage(acme.id, today - timedelta(days=1), today + timedelta(days=1))
        assert [(r.requests, r.prompt_tokens) for r in rows] == [(1, 2)]
    finally:
        ledger.close()

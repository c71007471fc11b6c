"""Registry and store: versions, quotas, isolation, atomic commits, persistence.

Every registry test runs against SQLite (the embedded default) and PostgreSQL (the shared one).
PostgreSQL comes from the `postgres_url` session fixture (tests/services.py): the server
TENANTLORA_TEST_POSTGRES_URL names (CI starts one with `.ci/postgres.sh`), else one the test run
starts and stops. Each test gets its own PostgreSQL schema, dropped afterwards."""

from __future__ import annotations

import threading
import uuid
from urllib.parse import quote

import pytest

from adapters.catalog import AdapterCatalog
from adapters.errors import Conflict, NotFound, QuotaExceeded
from adapters.keys import hash_key
from adapters.registry import Registry, split_pinned
from adapters.service import AdapterService
from adapters.store import AdapterStore
from adapters.validation import BaseModelSpec


def with_search_path(url: str, schema: str) -> str:
    """The same database URL, with every connection's search_path set to `schema`."""
    sep = "&" if "?" in url else "?"
    return f"{url}{sep}options={quote(f'-csearch_path={schema}')}"


@pytest.fixture()
def postgres_schema_url(postgres_url):
    """The session's PostgreSQL, in a schema of this test's own."""
    import psycopg

    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    yield with_search_path(postgres_url, schema)
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture(params=["sqlite", "postgresql"])
def registry_url(request, tmp_path):
    if request.param == "sqlite":
        return str(tmp_path / "registry.db")
    return request.getfixturevalue("postgres_schema_url")


@pytest.fixture()
def service(tmp_path, base_model_path, registry_url):
    spec = BaseModelSpec.from_checkpoint("base", base_model_path)
    registry = Registry(registry_url)
    yield AdapterService(
        registry, AdapterStore(tmp_path / "store"), spec, max_rank=16, max_bytes=50_000_000
    )
    registry.close()


def stored_bytes(registry_url: str, tmp_path) -> bytes:
    """Everything the database holds, as bytes: the SQLite files, or PostgreSQL's rows."""
    if not registry_url.startswith("postgresql://"):
        return b"".join(p.read_bytes() for p in tmp_path.glob("registry.db*"))  # db + WAL
    import psycopg

    with psycopg.connect(registry_url) as conn:
        rows = [
            *conn.execute("SELECT * FROM tenants").fetchall(),
            *conn.execute("SELECT * FROM api_keys").fetchall(),
            *conn.execute("SELECT * FROM adapter_versions").fetchall(),
        ]
    return repr(rows).encode()


def test_backend_follows_the_url(service, registry_url):
    expected = "postgresql" if registry_url.startswith("postgresql://") else "sqlite"
    assert service.registry.backend == expected
    with pytest.raises(ValueError, match="unsupported registry database URL"):
        Registry("mysql://x@y/z")


def test_keys_are_stored_only_as_hashes(tmp_path, service, registry_url):
    tenant, key = service.registry.create_tenant("acme", max_adapters=5, max_bytes=10**9)
    raw = stored_bytes(registry_url, tmp_path)
    assert key.encode() not in raw
    assert hash_key(key).encode() in raw
    assert service.registry.tenant_by_key(key) == tenant
    assert service.registry.tenant_by_key(key + "x") is None
    with pytest.raises(Conflict):
        service.registry.create_tenant("acme", max_adapters=5, max_bytes=10**9)


def test_versions_pinning_and_isolation(service, adapter_dirs):
    acme, _ = service.registry.create_tenant("acme", max_adapters=5, max_bytes=10**9)
    globex, _ = service.registry.create_tenant("globex", max_adapters=5, max_bytes=10**9)
    v1 = service.register_folder(acme, "support", adapter_dirs["a"])
    v2 = service.register_folder(acme, "support", adapter_dirs["b"])
    g1 = service.register_folder(globex, "support", adapter_dirs["c"])
    assert (v1.version, v2.version, g1.version) == (1, 2, 1)
    assert len({v1.id, v2.id, g1.id}) == 3
    assert len({v1.engine_name, v2.engine_name, g1.engine_name}) == 3
    assert AdapterCatalog(service.registry).resolve(acme, "support").id == v2.id
    assert AdapterCatalog(service.registry).resolve(acme, "support@1").id == v1.id
    assert AdapterCatalog(service.registry).resolve(globex, "support").id == g1.id
    assert AdapterCatalog(service.registry).resolve(globex, "support@2") is None
    with pytest.raises(NotFound):
        service.delete(globex, "support@2")
    service.delete(acme, "support@2")
    assert AdapterCatalog(service.registry).resolve(acme, "support").id == v1.id
    assert split_pinned("x@3") == ("x", 3) and split_pinned("x@y") == ("x@y", None)


def test_quota_refusal_stores_nothing(service, adapter_dirs):
    small, _ = service.registry.create_tenant("small", max_adapters=1, max_bytes=10**9)
    service.register_folder(small, "one", adapter_dirs["a"])
    before = sorted(p for p in service.store.root.rglob("*") if p.is_file())
    with pytest.raises(QuotaExceeded):
        service.register_folder(small, "two", adapter_dirs["b"])
    after = sorted(p for p in service.store.root.rglob("*") if p.is_file())
    assert before == after
    assert [a.name for a in AdapterCatalog(service.registry).visible(small)] == ["one"]


def test_static_adapters_are_not_held_to_the_public_quota(service, adapter_dirs):
    """The operator's --lora list is configuration: more of them than the public tenant's quota
    still register (the benchmark serves 128), while uploads to that tenant stay bounded."""
    service.public = service.registry.update_tenant(service.public, max_adapters=1)
    a = service.ensure_static("one", adapter_dirs["a"])
    b = service.ensure_static("two", adapter_dirs["b"])
    assert (a.name, b.name) == ("one", "two")
    with pytest.raises(QuotaExceeded):
        service.register_folder(service.public, "three", adapter_dirs["c"])


def test_registry_survives_reopen(service, adapter_dirs, registry_url):
    tenant, key = service.registry.create_tenant("acme", max_adapters=5, max_bytes=10**9)
    version = service.register_folder(tenant, "support", adapter_dirs["a"])
    service.registry.close()
    reopened = Registry(registry_url)
    again = reopened.tenant_by_key(key)
    assert again == tenant
    assert reopened.find_live(again, "support") == version
    reopened.close()


def test_identical_uploads_share_one_stored_copy(service, adapter_dirs):
    acme, _ = service.registry.create_tenant("acme", max_adapters=5, max_bytes=10**9)
    first = service.register_folder(acme, "x", adapter_dirs["a"])
    second = service.register_folder(acme, "y", adapter_dirs["a"])
    assert first.digest == second.digest and first.path == second.path
    service.delete(acme, "x")
    service.purge_files([first])
    assert (service.store.path_for(first.digest) / "adapter_model.safetensors").exists()
    service.delete(acme, "y")
    service.purge_files([second])
    assert not service.store.path_for(first.digest).exists()


def _add(registry: Registry, tenant, name: str, digest: str):
    return registry.add_version(
        tenant,
        name,
        digest=digest,
        path=f"/store/{digest}",
        size_bytes=10,
        rank=8,
        alpha=16.0,
        target_modules=("q_proj",),
        base_model="base",
        source="test",
    )


def test_replicas_sharing_one_database(registry_url):
    """Two registries on one database (two replicas): each sees the other's writes, versions stay
    unique and quotas hold under concurrent writers, and ids are never reused."""
    first, second = Registry(registry_url), Registry(registry_url)
    try:
        assert first.ensure_public_tenant() == second.ensure_public_tenant()
        tenant, key = first.create_tenant("shared", max_adapters=12, max_bytes=10**9)
        assert second.tenant_by_key(key) == tenant
        with pytest.raises(Conflict):
            second.create_tenant("shared", max_adapters=1, max_bytes=1)

        made, errors = [], []

        def writer(registry: Registry, tag: str) -> None:
            for i in range(8):
                try:
                    made.append(_add(registry, tenant, "model", f"{tag}{i}"))
                except QuotaExceeded as exc:
                    errors.append(exc)

        threads = [
            threading.Thread(target=writer, args=(r, t)) for r, t in ((first, "a"), (second, "b"))
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(made) == 12 and len(errors) == 4  # the quota held across both writers
        assert sorted(v.version for v in made) == list(range(1, 13))
        assert len({v.id for v in made}) == 12
        assert {v.id for v in second.list_live(tenant)} == {v.id for v in made}

        deleted = first.delete(tenant, "model", 12)
        assert second.find_live(tenant, "model").version == 11
        again = _add(second, tenant, "model", "c0")
        assert again.version == 13 and again.id > max(v.id for v in deleted)
    finally:
        first.close()
        second.close()


def test_postgres_connection_loss_is_survived(postgres_schema_url, postgres_url):
    """A replica whose database connection drops (server restart, idle timeout) reconnects.
    (PostgreSQL only: SQLite has no connection to lose.)"""
    import psycopg

    registry = Registry(postgres_schema_url)
    try:
        tenant, key = registry.create_tenant("acme", max_adapters=5, max_bytes=10**9)
        pid = registry._db._conn.info.backend_pid
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        assert registry.tenant_by_key(key) == tenant
        assert registry._db._conn.info.backend_pid != pid
        assert _add(registry, tenant, "after", "d1").version == 1
    finally:
        registry.close()

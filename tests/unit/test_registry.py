"""Registry and store: versions, quotas, isolation, atomic commits, persistence."""

from __future__ import annotations

import pytest

from adapters.errors import NotFound, QuotaExceeded
from adapters.keys import hash_key
from adapters.registry import Registry, split_pinned
from adapters.service import AdapterService
from adapters.store import AdapterStore
from adapters.validation import BaseModelSpec


@pytest.fixture()
def service(tmp_path, base_model_path):
    spec = BaseModelSpec.from_checkpoint("base", base_model_path)
    registry = Registry(tmp_path / "registry.db")
    return AdapterService(
        registry, AdapterStore(tmp_path / "store"), spec, max_rank=16, max_bytes=50_000_000
    )


def test_keys_are_stored_only_as_hashes(tmp_path, service):
    tenant, key = service.registry.create_tenant("acme", max_adapters=5, max_bytes=10**9)
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("registry.db*"))  # db + WAL
    assert key.encode() not in raw
    assert hash_key(key).encode() in raw
    assert service.registry.tenant_by_key(key) == tenant
    assert service.registry.tenant_by_key(key + "x") is None


def test_versions_pinning_and_isolation(service, adapter_dirs):
    acme, _ = service.registry.create_tenant("acme", max_adapters=5, max_bytes=10**9)
    globex, _ = service.registry.create_tenant("globex", max_adapters=5, max_bytes=10**9)
    v1 = service.register_folder(acme, "support", adapter_dirs["a"])
    v2 = service.register_folder(acme, "support", adapter_dirs["b"])
    g1 = service.register_folder(globex, "support", adapter_dirs["c"])
    assert (v1.version, v2.version, g1.version) == (1, 2, 1)
    assert len({v1.id, v2.id, g1.id}) == 3
    assert len({v1.engine_name, v2.engine_name, g1.engine_name}) == 3
    assert service.resolve(acme, "support").id == v2.id
    assert service.resolve(acme, "support@1").id == v1.id
    assert service.resolve(globex, "support").id == g1.id
    assert service.resolve(globex, "support@2") is None
    with pytest.raises(NotFound):
        service.delete(globex, "support@2")
    service.delete(acme, "support@2")
    assert service.resolve(acme, "support").id == v1.id
    assert split_pinned("x@3") == ("x", 3) and split_pinned("x@y") == ("x@y", None)


def test_quota_refusal_stores_nothing(service, adapter_dirs):
    small, _ = service.registry.create_tenant("small", max_adapters=1, max_bytes=10**9)
    service.register_folder(small, "one", adapter_dirs["a"])
    before = sorted(p for p in service.store.root.rglob("*") if p.is_file())
    with pytest.raises(QuotaExceeded):
        service.register_folder(small, "two", adapter_dirs["b"])
    after = sorted(p for p in service.store.root.rglob("*") if p.is_file())
    assert before == after
    assert [a.name for a in service.visible(small)] == ["one"]


def test_registry_survives_reopen(tmp_path, service, adapter_dirs):
    tenant, key = service.registry.create_tenant("acme", max_adapters=5, max_bytes=10**9)
    version = service.register_folder(tenant, "support", adapter_dirs["a"])
    service.registry.close()
    reopened = Registry(tmp_path / "registry.db")
    again = reopened.tenant_by_key(key)
    assert again == tenant
    assert reopened.find_live(again, "support") == version


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

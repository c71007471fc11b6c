"""Adapter sources (adapters/sources.py, s3.py, s3_watch.py) without the engine: URIs, and the
S3 source and watcher against a real local S3-compatible server (moto, started by the tests)
that checks credentials, through the real registration pipeline."""

from __future__ import annotations

import dataclasses
import json
import uuid
from pathlib import Path

import pytest

from adapters.errors import (
    AdapterError,
    AdapterTooLarge,
    InvalidAdapter,
    NotFound,
    SourceNotAllowed,
)
from adapters.registry import Registry
from adapters.s3 import S3Config, S3Source, SourceAccessDenied, parse_s3_uri
from adapters.s3_watch import S3Watcher, WatchedPrefix
from adapters.service import AdapterService
from adapters.sources import (
    FolderSource,
    HubSource,
    SourceRules,
    register_from,
    source_for,
)
from adapters.store import AdapterStore
from adapters.validation import BaseModelSpec

MB = 1 << 20
BUCKET = "unit-adapters"


@pytest.fixture
def service(tmp_path, base_model_path) -> AdapterService:
    return AdapterService(
        Registry(tmp_path / "registry.db"),
        AdapterStore(tmp_path / "store"),
        BaseModelSpec.from_checkpoint("SmolLM2-135M-Instruct", base_model_path),
        max_rank=16,
        max_bytes=50 * MB,
    )


@pytest.fixture
def s3(s3_server):
    client = s3_server.client()
    if BUCKET not in [b["Name"] for b in client.list_buckets()["Buckets"]]:
        client.create_bucket(Bucket=BUCKET)
    return client


@pytest.fixture
def config(s3_server) -> S3Config:
    return S3Config(
        endpoint_url=s3_server.url,
        region=s3_server.region,
        access_key_id=_secret(s3_server.access_key_id),
        secret_access_key=_secret(s3_server.secret_access_key),
        allowed_prefixes=(f"s3://{BUCKET}/{{tenant}}/",),
        timeout=30,
    )


def _secret(value: str):
    from pydantic import SecretStr

    return SecretStr(value)


def _put_adapter(client, prefix: str, folder: Path, **extra: bytes) -> None:
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        client.put_object(Bucket=BUCKET, Key=prefix + name, Body=(folder / name).read_bytes())
    for name, data in extra.items():
        client.put_object(Bucket=BUCKET, Key=prefix + name, Body=data)


def _unique(tenant: str) -> str:
    return f"{tenant}/{uuid.uuid4().hex[:8]}/"


# ---- URIs --------------------------------------------------------------------------------------


def test_source_for_each_scheme(tmp_path, config):
    rules = SourceRules([tmp_path], 5.0, config)
    s3 = source_for("s3://unit-adapters/acme/support", rules, "acme")
    assert isinstance(s3, S3Source) and s3.label == "s3://unit-adapters/acme/support/"
    assert not s3.admin_only
    hub = source_for("hf://org/lora@v2", rules, "acme")
    assert isinstance(hub, HubSource) and (hub.hub_id, hub.revision, hub.timeout) == (
        "org/lora",
        "v2",
        5.0,
    )
    assert hub.label == "hub:org/lora" and hub.admin_only
    for uri in (f"file://{tmp_path}", str(tmp_path)):
        folder = source_for(uri, rules, "acme")
        assert isinstance(folder, FolderSource) and folder.admin_only and folder.label == "folder"


@pytest.mark.parametrize(
    "uri",
    [
        "relative/folder",
        "http://169.254.169.254/latest",
        "s3://unit-adapters",
        "s3://unit-adapters/",
        "s3://unit-adapters/a/../b",
        "s3://UPPER/a",
        "s3://x/a",
        "s3://unit-adapters/a b",
        "s3://unit-adapters/a\x00b",
    ],
)
def test_bad_uris_are_refused(uri, config):
    with pytest.raises(InvalidAdapter) as err:
        source_for(uri, SourceRules(s3=config), "acme")
    assert err.value.code == "invalid_uri"


def test_s3_is_off_without_settings():
    with pytest.raises(SourceNotAllowed):
        source_for("s3://unit-adapters/acme/x", SourceRules(), "acme")


def test_prefix_rules():
    assert parse_s3_uri("s3://b-1/a/b") == ("b-1", "a/b/")
    with pytest.raises(InvalidAdapter):
        parse_s3_uri("s3://b-1/a//b/")
    config = S3Config(allowed_prefixes=("s3://b1/{tenant}", "s3://shared/models/"))
    assert config.allows("s3://b1/acme/x/", "acme")
    assert not config.allows("s3://b1/acmeco/x/", "acme")  # a prefix is a folder
    assert not config.allows("s3://b1/other/x/", "acme")
    assert config.allows("s3://shared/models/x/", "anyone")
    assert not config.allows("s3://shared/modelsx/", "anyone")
    assert "secret" not in repr(
        dataclasses.replace(config, access_key_id=_secret("k"), endpoint_url="http://secret")
    )


# ---- S3 through the registration pipeline ------------------------------------------------------


def test_register_and_version_from_s3(service, s3, config, adapter_dirs, s3_server):
    tenant, _ = service.registry.create_tenant("acme", max_adapters=10, max_bytes=10**9)
    first, second = _unique("acme"), _unique("acme")
    _put_adapter(s3, first, adapter_dirs["a"], **{"README.md": b"# card"})
    _put_adapter(s3, second, adapter_dirs["b"])
    v1 = register_from(service, tenant, "support", S3Source(BUCKET, first, config, "acme"))
    v2 = register_from(service, tenant, "support", S3Source(BUCKET, second, config, "acme"))
    assert (v1.version, v2.version) == (1, 2)
    assert v1.source == f"s3://{BUCKET}/{first}"
    assert v2.public_dict()["source"] == "s3"  # responses show the kind only
    assert v1.digest != v2.digest
    assert not any(service.store.staging.iterdir())


@pytest.mark.parametrize(
    ("extra", "error", "code"),
    [
        ({"train.py": b"print()"}, InvalidAdapter, "unexpected_file"),
        ({"adapter_model.bin": b"x"}, InvalidAdapter, "pickle_weights_refused"),
        ({"sub/adapter_config.json": b"{}"}, InvalidAdapter, "unexpected_file"),
    ],
)
def test_bad_objects_are_refused_like_archives(
    service, s3, config, adapter_dirs, extra, error, code
):
    tenant, _ = service.registry.create_tenant("acme", max_adapters=10, max_bytes=10**9)
    prefix = _unique("acme")
    _put_adapter(s3, prefix, adapter_dirs["a"], **extra)
    with pytest.raises(error) as err:
        register_from(service, tenant, "x", S3Source(BUCKET, prefix, config, "acme"))
    assert err.value.code == code
    assert not any(service.store.staging.iterdir())
    assert service.registry.find_live(tenant, "x") is None


def test_not_an_adapter(service, s3, config, adapter_dirs):
    tenant, _ = service.registry.create_tenant("acme", max_adapters=10, max_bytes=10**9)
    missing, garbage = _unique("acme"), _unique("acme")
    s3.put_object(Bucket=BUCKET, Key=missing + "adapter_config.json", Body=b'{"peft_type": "LORA"}')
    _put_adapter(s3, garbage, adapter_dirs["a"])
    s3.put_object(Bucket=BUCKET, Key=garbage + "adapter_model.safetensors", Body=b"\x00" * 64)
    for prefix, code in ((missing, "missing_file"), (garbage, "corrupt_weights")):
        with pytest.raises(InvalidAdapter) as err:
            register_from(service, tenant, "x", S3Source(BUCKET, prefix, config, "acme"))
        assert err.value.code == code


def test_size_cap(service, s3, config, adapter_dirs):
    tenant, _ = service.registry.create_tenant("acme", max_adapters=10, max_bytes=10**9)
    prefix = _unique("acme")
    _put_adapter(s3, prefix, adapter_dirs["a"])
    service.max_bytes = 1 * MB  # the adapter is 9.8 MB: refused from the listing
    with pytest.raises(AdapterTooLarge):
        register_from(service, tenant, "x", S3Source(BUCKET, prefix, config, "acme"))
    assert not any(service.store.staging.iterdir())


def test_missing_wrong_credentials_and_not_allowed(service, s3, config, s3_server):
    tenant, _ = service.registry.create_tenant("acme", max_adapters=10, max_bytes=10**9)
    cases = [
        (S3Source(BUCKET, "acme/nothing-here/", config, "acme"), NotFound, "source_not_found"),
        (S3Source("no-such-bucket", "acme/x/", _any_bucket(config), "acme"), NotFound, None),
        (
            S3Source(
                BUCKET,
                "acme/x/",
                dataclasses.replace(config, secret_access_key=_secret("wrong")),
                "acme",
            ),
            SourceAccessDenied,
            "source_access_denied",
        ),
        (S3Source(BUCKET, "other/x/", config, "acme"), SourceNotAllowed, "source_not_allowed"),
    ]
    for source, error, code in cases:
        with pytest.raises(error) as err:
            register_from(service, tenant, "x", source)
        assert code is None or err.value.code == code
        message = str(err.value)
        for secret in (s3_server.url, s3_server.access_key_id, s3_server.secret_access_key):
            assert secret not in message
        assert f"s3://{source.bucket}/{source.prefix}" in message or error is SourceNotAllowed


def _any_bucket(config: S3Config) -> S3Config:
    return dataclasses.replace(config, allowed_prefixes=("s3://no-such-bucket/",))


# ---- the watcher -------------------------------------------------------------------------------


def test_watch_registers_new_folders_once(service, s3, config, adapter_dirs):
    tenant, _ = service.registry.create_tenant("watched", max_adapters=10, max_bytes=10**9)
    root = _unique("watch")
    watch = WatchedPrefix("watched", BUCKET, root)
    watcher = S3Watcher(service, config, [watch], interval=3600)
    assert watcher.poll() == 0  # nothing there yet
    _put_adapter(s3, f"{root}support/v001/", adapter_dirs["a"])
    _put_adapter(s3, f"{root}support/v002/", adapter_dirs["b"])  # only the newest counts
    s3.put_object(Bucket=BUCKET, Key=f"{root}broken/v1/adapter_config.json", Body=b"{")
    assert watcher.poll() == 1
    live = service.registry.find_live(tenant, "support")
    assert (live.version, live.source) == (1, f"s3://{BUCKET}/{root}support/v002/")
    assert watcher.poll() == 0
    # a restart (a new watcher, nothing in memory) registers nothing twice
    assert S3Watcher(service, config, [watch], interval=3600).poll() == 0
    _put_adapter(s3, f"{root}support/v003/", adapter_dirs["c"])
    assert watcher.poll() == 1
    assert service.registry.find_live(tenant, "support").version == 2
    assert service.registry.find_live(tenant, "broken") is None


def test_watch_spec_parsing():
    assert WatchedPrefix.parse("acme=s3://bk1/team/loras") == WatchedPrefix(
        "acme", "bk1", "team/loras/"
    )
    for bad in ("s3://b1/x/", "bad name=s3://b1/x/", "acme=http://b1/x/"):
        with pytest.raises((ValueError, AdapterError)):
            WatchedPrefix.parse(bad)


def test_s3_settings_round_trip():
    from serving.settings import Settings

    settings = Settings(
        s3_allowed_prefixes=["s3://b1/{tenant}/"], s3_secret_access_key="abc", s3_watch=[]
    )
    config = S3Config.from_settings(settings)
    assert config is not None and config.allowed_prefixes == ("s3://b1/{tenant}/",)
    assert "abc" not in repr(config) and "abc" not in json.dumps(
        settings.model_dump(mode="json"), default=str
    )
    assert S3Config.from_settings(Settings()) is None

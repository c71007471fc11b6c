"""Tenant isolation on the request path, against the real engine over HTTP (issue 12):
private prefix caches, closed metrics, no internals in responses, strict JSON bodies, and
anonymous callers who may read and generate but never write."""

from __future__ import annotations

import json
import shutil
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support import adapter_archive

# About 700 tokens: several KV blocks, so a repeat can hit the prefix cache.
LONG_PROMPT = " ".join(f"item {i} is a {('red', 'green', 'blue')[i % 3]} box." for i in range(110))


def _post(server, key: str | None, path: str, **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    headers.update(kwargs.pop("headers", {}))
    return httpx.post(f"{server.url}{path}", headers=headers, timeout=120, **kwargs)


def _counter(server, name: str) -> float:
    text = server.admin("GET", "/metrics").text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                total += sample.value
    return total


def _hits_after(server, key: str, extra: dict | None = None) -> float:
    """Prefix-cache hit tokens the engine counted for one completion of LONG_PROMPT."""
    before = _counter(server, "vllm:prefix_cache_hits_total")
    body = {
        "model": server.base_model_name,
        "prompt": LONG_PROMPT,
        "max_tokens": 1,
        **(extra or {}),
    }
    response = _post(server, key, "/v1/completions", json=body)
    assert response.status_code == 200, response.text
    time.sleep(1.0)  # the engine reports its counters with the step's stats
    return _counter(server, "vllm:prefix_cache_hits_total") - before


@pytest.fixture(scope="module")
def two_tenants(live_server):
    return live_server.create_tenant("cache-a"), live_server.create_tenant("cache-b")


def test_prefix_cache_is_private_per_tenant(live_server, two_tenants):
    a, b = two_tenants
    assert _hits_after(live_server, a) == 0  # first sight of the prompt
    assert _hits_after(live_server, b) == 0  # the same prompt from another tenant: no hit
    assert _hits_after(live_server, a) > 0  # the same tenant again: its own cache hits
    # A client's own cache_salt is namespaced under its tenant: the same salt from the other
    # tenant does not join the first one's cache.
    assert _hits_after(live_server, a, {"cache_salt": "shared-salt"}) == 0
    assert _hits_after(live_server, b, {"cache_salt": "shared-salt"}) == 0
    assert _hits_after(live_server, b, {"cache_salt": "shared-salt"}) > 0


def test_metrics_need_the_admin_key_and_forget_deleted_adapters(live_server, adapter_dirs):
    key = live_server.create_tenant("metrics-t")
    assert httpx.get(f"{live_server.url}/metrics", timeout=30).status_code == 401
    tenant_view = httpx.get(
        f"{live_server.url}/metrics", headers={"Authorization": f"Bearer {key}"}, timeout=30
    )
    assert tenant_view.status_code == 401
    assert tenant_view.json()["error"]["code"] == "metrics_key_required"

    upload = _post(
        live_server,
        key,
        "/v1/adapters",
        data={"name": "ephemeral"},
        files={"file": ("a.tar.gz", adapter_archive(adapter_dirs["c"]))},
    )
    assert upload.status_code == 201, upload.text
    chat = {"model": "ephemeral", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert _post(live_server, key, "/v1/chat/completions", json=chat).status_code == 200
    label = 'adapter="ephemeral@1"'  # this tenant's own name for it (unique in the session)
    assert label in live_server.admin("GET", "/metrics").text
    delete = httpx.delete(
        f"{live_server.base_url}/adapters/ephemeral",
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
    )
    assert delete.status_code == 200
    deadline = time.monotonic() + 30
    while label in live_server.admin("GET", "/metrics").text:
        assert time.monotonic() < deadline, "the deleted adapter's series stayed"
        time.sleep(0.5)


def test_no_server_paths_or_internals_in_responses(live_server, tenant_key):
    health = httpx.get(f"{live_server.url}/health", timeout=10)
    assert health.json() == {"status": "ok"}
    for path in ("/docs", "/openapi.json", "/redoc"):
        assert httpx.get(f"{live_server.url}{path}", timeout=10).status_code == 404
    models = httpx.get(
        f"{live_server.base_url}/models",
        headers={"Authorization": f"Bearer {tenant_key}"},
        timeout=10,
    ).json()["data"]
    text = json.dumps(models)
    assert str(live_server.base_model) not in text and str(live_server.data_dir) not in text
    assert models[0]["root"] == live_server.base_model_name
    # Only the caller's own name and the server's `public` tenant appear as owners.
    assert {m["owned_by"] for m in models} <= {"tenantlora", "apitester", "public"}


@pytest.mark.parametrize("model", ["a@999999999999999999", "a@²", "a@-1", "../../etc", "a" * 300])
def test_odd_model_names_are_the_plain_404(live_server, tenant_key, model):
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    response = _post(live_server, tenant_key, "/v1/chat/completions", json=body)
    assert response.status_code == 404, response.text
    error = response.json()["error"]
    assert error["code"] == "model_not_found"
    assert "sqlite" not in error["message"].lower() and "valueerror" not in error["message"].lower()


def test_strict_json_bodies(live_server, tenant_key):
    def send(raw: bytes | str, **headers) -> httpx.Response:
        return _post(
            live_server,
            tenant_key,
            "/v1/chat/completions",
            content=raw,
            headers={"content-type": "application/json", **headers},
        )

    base = {"model": "a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    nan = json.dumps({**base, "logit_bias": {"1": float("nan")}})
    assert "NaN" in nan
    response = send(nan)
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json"
    assert send(json.dumps({**base, "temperature": float("inf")})).status_code == 400

    deep = "[" * 100_000 + "]" * 100_000
    response = send(deep)
    assert response.status_code == 400, response.text[:200]
    assert "deeper" in response.json()["error"]["message"]
    assert (
        send(json.dumps({**base, "user": [[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]})).status_code == 400
    )

    huge = json.dumps({**base, "user": "x" * (9 * 1024 * 1024)})
    assert send(huge).status_code == 413

    def chunks():  # no Content-Length: the server must stop reading at its limit
        yield b'{"model": "a", "user": "'
        for _ in range(200):
            yield b"x" * (64 * 1024)
        yield b'"}'

    chunked = httpx.post(
        f"{live_server.url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {tenant_key}", "content-type": "application/json"},
        content=chunks(),
        timeout=60,
    )
    assert chunked.status_code == 413
    # ... and the server keeps serving.
    assert send(json.dumps(base)).status_code == 200


@pytest.fixture(scope="module")
def open_server(base_model_path, adapter_dirs, tmp_path_factory):
    """A second server where auth is not required: anonymous callers act as `public`."""
    import os

    from conftest import ServerProcess

    data_dir = tmp_path_factory.mktemp("open-server")
    server = ServerProcess(
        data_dir,
        base_model_path,
        ["--lora", f"a={adapter_dirs['a']}", "--max-loras", "1", "--max-model-len", "512",
         "--max-num-seqs", "4", "--kv-cache-gib", "0.25"],
        data_dir / "server.log",
    )  # fmt: skip
    os.environ["TENANTLORA_AUTH_REQUIRED"] = "false"
    try:
        server.start()
    finally:
        del os.environ["TENANTLORA_AUTH_REQUIRED"]
    yield server
    server.stop()


def test_anonymous_callers_read_and_generate_but_never_write(open_server, adapter_dirs):
    models = httpx.get(f"{open_server.base_url}/models", timeout=30)
    assert models.status_code == 200
    assert [m["id"] for m in models.json()["data"]] == [open_server.base_model_name, "a"]
    chat = {"model": "a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert _post(open_server, None, "/v1/chat/completions", json=chat).status_code == 200

    archive = adapter_archive(adapter_dirs["b"])
    upload = _post(
        open_server, None, "/v1/adapters", data={"name": "a"}, files={"file": ("a.tar.gz", archive)}
    )
    assert upload.status_code == 403
    assert upload.json()["error"]["code"] == "tenant_key_required"
    delete = httpx.delete(f"{open_server.base_url}/adapters/a", timeout=30)
    assert delete.status_code == 403
    # The static adapter still serves what it served.
    listing = httpx.get(f"{open_server.base_url}/adapters", timeout=30).json()["data"]
    assert [(a["name"], a["version"]) for a in listing] == [("a", 1)]


def test_no_admin_key_refuses_to_listen_beyond_loopback(base_model_path, tmp_path):
    """Without an admin key the server refuses to listen beyond loopback, before it loads the
    engine. (Its upload route being off is tests/unit/test_auth.py.)"""
    import os
    import subprocess
    import sys

    from conftest import REPO

    env = {k: v for k, v in os.environ.items() if k != "TENANTLORA_ADMIN_KEY"}
    env["TENANTLORA_DATA_DIR"] = str(tmp_path)
    started = time.monotonic()
    refused = subprocess.run(
        [sys.executable, "-m", "serving.cli", "serve", "--host", "0.0.0.0",
         "--base-model", str(base_model_path)],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert refused.returncode != 0
    assert "without an admin key" in refused.stderr + refused.stdout
    assert time.monotonic() - started < 60


def test_deleted_adapter_is_purged_after_clients_disconnect(live_server, adapter_dirs, tmp_path):
    """Streams whose clients leave (right after the headers, and mid-stream) release the adapter:
    a deletion then drops it from the engine and removes its files, without waiting for them."""
    key = live_server.create_tenant("disconnector")
    # Content no other test uploads (a shared digest would rightly keep the files).
    folder = tmp_path / "leaver"
    shutil.copytree(adapter_dirs["d"], folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["lora_alpha"] = 13
    (folder / "adapter_config.json").write_text(json.dumps(config))
    upload = _post(
        live_server,
        key,
        "/v1/adapters",
        data={"name": "leaver"},
        files={"file": ("a.tar.gz", adapter_archive(folder))},
    )
    assert upload.status_code == 201, upload.text
    digest = upload.json()["sha256"]
    stored = live_server.data_dir / "adapters" / digest[:2] / digest
    assert stored.is_dir()
    body = {
        "model": "leaver",
        "messages": [{"role": "user", "content": "Count to a thousand."}],
        "max_tokens": 1000,  # each stream would hold the adapter for 30 s or more
        "stream": True,
        "ignore_eos": True,
    }
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=live_server.url, headers=headers, timeout=60) as client:
        for chunks_to_read in (0, 3):
            with client.stream("POST", "/v1/chat/completions", json=body) as response:
                assert response.status_code == 200
                for i, _ in enumerate(response.iter_lines()):
                    if i >= chunks_to_read:
                        break
            # leaving the `with` closes the connection: the client is gone
    started = time.monotonic()
    delete = httpx.delete(f"{live_server.base_url}/adapters/leaver", headers=headers, timeout=30)
    assert delete.status_code == 200
    while stored.exists():
        assert time.monotonic() - started < 20, "the adapter stayed held after its clients left"
        time.sleep(0.25)

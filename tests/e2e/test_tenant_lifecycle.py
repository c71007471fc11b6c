"""Keys, tenants and usage against the real server (shared session server, real engine).

Several keys per tenant, revocation and expiry, rotation without downtime, tenant deletion
(keys stop at once, adapters go, files purged unless another tenant has the same content),
quota and limit updates, bad PATCH values, the usage ledger against the responses' `usage`
fields, and the command-line client. Tenant names here start with `lc-` (names are not reused).
Persistence across a restart is checked in test_zz_restart.py, which restarts the server."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import UTC, datetime

import httpx
import openai
import pytest

from adapters.store import AdapterStore

MSG = [{"role": "user", "content": "Name a colour."}]


def _greedy(client, model: str, max_tokens: int = 8):
    return client.chat.completions.create(
        model=model, messages=MSG, temperature=0, max_tokens=max_tokens
    )


def _as(server, key: str, method: str, path: str, **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"}
    return httpx.request(method, f"{server.url}{path}", headers=headers, timeout=120, **kwargs)


def _new_key(server, tenant: str, **body) -> dict:
    r = server.admin("POST", f"/v1/tenants/{tenant}/keys", json=body)
    assert r.status_code == 201, r.text
    return r.json()


def key_works(server, key: str) -> bool:
    """Whether the server accepts the key on an OpenAI route (401: it does not)."""
    try:
        server.client(key).models.list()
    except openai.AuthenticationError:
        return False
    return True


def test_several_keys_revocation_and_rotation(live_server):
    first = live_server.create_tenant("lc-keys")
    second = _new_key(live_server, "lc-keys", name="rotation")["api_key"]
    assert key_works(live_server, first) and key_works(live_server, second)  # new key works at once
    assert _greedy(live_server.client(second), live_server.base_model_name).choices

    listed = live_server.admin("GET", "/v1/tenants/lc-keys/keys").json()["data"]
    assert [(k["name"], k["active"]) for k in listed] == [("initial key", True), ("rotation", True)]
    assert listed[1]["prefix"] == second[:8]
    assert first not in json.dumps(listed) and second not in json.dumps(listed)

    # rotation: the old key keeps working until it is revoked, then it is refused at once
    old_id = listed[0]["id"]
    assert key_works(live_server, first)
    revoked = live_server.admin("DELETE", f"/v1/tenants/lc-keys/keys/{old_id}")
    assert revoked.status_code == 200 and revoked.json()["active"] is False
    assert not key_works(live_server, first)
    with pytest.raises(openai.AuthenticationError):
        _greedy(live_server.client(first), live_server.base_model_name)
    assert key_works(live_server, second)

    # a tenant manages its own keys and sees no one else's
    other = live_server.create_tenant("lc-keys-other")
    own = _as(live_server, other, "GET", "/v1/keys").json()["data"]
    assert len(own) == 1 and own[0]["id"] not in {k["id"] for k in listed}
    refused = _as(live_server, other, "DELETE", f"/v1/keys/{listed[1]['id']}")
    assert refused.status_code == 404 and refused.json()["error"]["code"] == "key_not_found"
    assert key_works(live_server, second)
    made = _as(live_server, second, "POST", "/v1/keys", json={"name": "self"})
    assert made.status_code == 201 and key_works(live_server, made.json()["api_key"])
    gone = _as(live_server, second, "DELETE", f"/v1/keys/{made.json()['id']}")
    assert gone.status_code == 200 and not key_works(live_server, made.json()["api_key"])


def test_expired_key_is_refused(live_server):
    live_server.create_tenant("lc-expiry")
    key = _new_key(live_server, "lc-expiry", expires_in_seconds=2)
    assert key["expires_at"] is not None and key_works(live_server, key["api_key"])
    # expiry plus the key cache's 2 s (lookup_cache_seconds) at most
    time.sleep(max(0.0, key["expires_at"] - time.time()) + 2.5)
    assert not key_works(live_server, key["api_key"])
    listed = live_server.admin("GET", "/v1/tenants/lc-expiry/keys").json()["data"]
    assert [k["active"] for k in listed] == [True, False]


def _register(server, name: str, folder, tenant: str) -> str:
    """Register a server-side adapter folder for a tenant (admin); return its stored digest."""
    data = {"name": name, "path": str(folder), "tenant": tenant}
    r = server.admin("POST", "/v1/adapters", data=data, files={"_": ("", b"")})
    assert r.status_code == 201, r.text
    return r.json()["sha256"]


def _stored(server, digest: str) -> bool:
    return AdapterStore(server.data_dir / "adapters").path_for(digest).exists()


def test_tenant_deletion(live_server, adapter_dirs, tmp_path):
    from support import make_random_adapters

    [unique] = make_random_adapters(live_server.base_model, {tmp_path / "lc-unique": 4242})
    doomed = live_server.create_tenant("lc-doomed")
    keeper = live_server.create_tenant("lc-keeper")
    spare = _new_key(live_server, "lc-doomed")["api_key"]
    twins = {
        _register(live_server, "twin", adapter_dirs["c"], t) for t in ("lc-doomed", "lc-keeper")
    }
    [twin] = twins  # the same bytes under two tenants: one stored copy
    mine = _register(live_server, "mine", unique, "lc-doomed")
    keeper_client = live_server.client(keeper)
    before = _greedy(keeper_client, "twin", 16).choices[0].message.content
    assert _stored(live_server, mine) and _stored(live_server, twin)

    # a request running when the tenant is deleted finishes
    stream = live_server.client(doomed).chat.completions.create(
        model="mine", messages=MSG, temperature=0, max_tokens=48, stream=True
    )
    first = next(iter(stream))
    deleted = live_server.admin("DELETE", "/v1/tenants/lc-doomed")
    assert deleted.status_code == 200, deleted.text
    assert sorted(deleted.json()["adapters"]) == ["mine@1", "twin@1"]
    assert not key_works(live_server, doomed) and not key_works(live_server, spare)  # at once
    rest = list(stream)
    assert first.choices and rest[-1].choices[0].finish_reason in ("stop", "length")

    # its adapters are gone; the other tenant's twin (same content) keeps serving
    assert live_server.admin("GET", "/v1/tenants/lc-doomed").status_code == 404
    assert live_server.admin("DELETE", "/v1/adapters/mine?tenant=lc-doomed").status_code == 404
    assert _greedy(keeper_client, "twin", 16).choices[0].message.content == before
    with pytest.raises(openai.NotFoundError):
        _greedy(keeper_client, "mine")
    deadline = time.monotonic() + 60
    while _stored(live_server, mine) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _stored(live_server, mine)
    assert _stored(live_server, twin)
    assert "lc-doomed" not in [
        t["name"] for t in live_server.admin("GET", "/v1/tenants").json()["data"]
    ]
    again = live_server.admin("POST", "/v1/tenants", json={"name": "lc-doomed"})
    assert again.status_code == 409  # names of deleted tenants are not reused
    public = live_server.admin("DELETE", "/v1/tenants/public")
    assert public.status_code == 400 and public.json()["error"]["code"] == "public_tenant"


def test_quota_and_limit_updates(live_server, adapter_dirs):
    live_server.create_tenant("lc-quota", max_adapters=1)
    live_server.register_adapter("one", adapter_dirs["a"], tenant="lc-quota")

    def upload_two() -> httpx.Response:
        data = {"name": "two", "path": str(adapter_dirs["b"]), "tenant": "lc-quota"}
        return live_server.admin("POST", "/v1/adapters", data=data, files={"_": ("", b"")})

    refused = upload_two()
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "quota_exceeded"
    patched = live_server.admin(
        "PATCH", "/v1/tenants/lc-quota", json={"max_adapters": 2, "max_n": 2, "weight": 3}
    )
    assert patched.status_code == 200, patched.text
    assert upload_two().status_code == 201  # the new quota holds at once
    shown = live_server.admin("GET", "/v1/tenants/lc-quota").json()
    assert (shown["max_adapters"], shown["max_n"], shown["weight"]) == (2, 2, 3.0)
    assert shown["max_concurrent"] is None  # not set: the server's default
    reset = live_server.admin("PATCH", "/v1/tenants/lc-quota", json={"weight": None}).json()
    assert reset["weight"] is None and reset["max_n"] == 2


@pytest.mark.parametrize(
    "body",
    [
        {"max_concurrent": -1},
        {"requests_per_minute": 0},
        {"tokens_per_minute": "lots"},
        {"max_n": 2.5},
        {"weight": -1},
        {"max_adapters": None},
        {"max_prompts": 1, "surprise": True},
    ],
)
def test_patch_with_bad_values_is_400(live_server, body):
    if live_server.admin("GET", "/v1/tenants/lc-patch").status_code != 200:
        live_server.create_tenant("lc-patch")
    r = live_server.admin("PATCH", "/v1/tenants/lc-patch", json=body)
    assert r.status_code == 400, r.text
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_patch_with_nan_is_400(live_server):
    live_server.create_tenant("lc-nan")
    r = live_server.admin(
        "PATCH",
        "/v1/tenants/lc-nan",
        content=b'{"weight": NaN}',
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert live_server.admin("GET", "/v1/tenants/lc-nan").json()["weight"] is None


def _usage(server, key: str, **params) -> list[dict]:
    r = _as(server, key, "GET", "/v1/usage", params=params)
    assert r.status_code == 200, r.text
    return r.json()["data"]


def test_usage_ledger_matches_responses(live_server):
    key = live_server.create_tenant("lc-usage")
    client, base = live_server.client(key), live_server.base_model_name
    outs = [_greedy(client, base), _greedy(client, base, 4), _greedy(client, "a", 6)]
    completion = client.completions.create(model="a", prompt="The sea is", max_tokens=5)
    chunks = list(
        client.chat.completions.create(
            model=base, messages=MSG, max_tokens=7, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    streamed = chunks[-1].usage
    expected = {
        base: [3, outs[0].usage.prompt_tokens + outs[1].usage.prompt_tokens + streamed.prompt_tokens,
               outs[0].usage.completion_tokens + outs[1].usage.completion_tokens + streamed.completion_tokens],
        "a@1": [2, outs[2].usage.prompt_tokens + completion.usage.prompt_tokens,
                outs[2].usage.completion_tokens + completion.usage.completion_tokens],
    }  # fmt: skip
    today = datetime.now(UTC).date().isoformat()
    rows = _usage(live_server, key, start=today, end=today)
    got = {r["model"]: [r["requests"], r["prompt_tokens"], r["completion_tokens"]] for r in rows}
    assert got == expected
    assert {r["tenant"] for r in rows} == {"lc-usage"}

    # the admin sees it under the tenant's name; another tenant sees none of it
    admin_rows = _usage(live_server, live_server.admin_key, tenant="lc-usage")
    assert {r["model"]: r["requests"] for r in admin_rows} == {base: 3, "a@1": 2}
    everyone = _usage(live_server, live_server.admin_key)
    assert "lc-usage" in {r["tenant"] for r in everyone}
    other = live_server.create_tenant("lc-usage-other")
    assert _usage(live_server, other) == []
    spy = _as(live_server, other, "GET", "/v1/usage", params={"tenant": "lc-usage"})
    assert spy.status_code == 403
    bad = _as(live_server, key, "GET", "/v1/usage", params={"start": "2025-02-30"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_date"


def _cli(server, *args: str, key: str, ok: bool = True) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "serving.cli", *args, "--url", server.url, "--key", key],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert (result.returncode == 0) == ok, result.stderr
    return result.stdout if ok else result.stderr


def test_command_line_client_lifecycle(live_server):
    admin = live_server.admin_key
    created = json.loads(
        _cli(live_server, "tenants", "create", "lc-cli", "--max-concurrent", "3", key=admin)
    )
    key = created["api_key"]
    assert created["max_concurrent"] == 3
    listing = _cli(live_server, "tenants", "list", key=admin)
    assert "lc-cli" in listing and key not in listing
    updated = json.loads(
        _cli(live_server, "tenants", "update", "lc-cli", "--max-n", "4", "--reset",
             "max_concurrent", key=admin)
    )  # fmt: skip
    assert (updated["max_n"], updated["max_concurrent"]) == (4, None)
    assert json.loads(_cli(live_server, "tenants", "show", "lc-cli", key=admin))["max_n"] == 4

    made = json.loads(
        _cli(live_server, "keys", "create", "--tenant", "lc-cli", "--name", "ops", key=admin)
    )
    own = json.loads(_cli(live_server, "keys", "create", "--expires-in", "3600", key=key))
    keys_table = _cli(live_server, "keys", "list", "--tenant", "lc-cli", key=admin)
    assert "ops" in keys_table and made["prefix"] in keys_table and own["prefix"] in keys_table
    for secret in (key, made["api_key"], own["api_key"]):
        assert secret not in keys_table
    assert key_works(live_server, made["api_key"])
    _cli(live_server, "keys", "revoke", str(made["id"]), "--tenant", "lc-cli", key=admin)
    assert not key_works(live_server, made["api_key"])
    _cli(live_server, "keys", "revoke", str(own["id"]), key=key)
    assert not key_works(live_server, own["api_key"])

    _greedy(live_server.client(key), live_server.base_model_name)
    table = _cli(live_server, "usage", key=key)
    assert live_server.base_model_name in table and "lc-cli" in table
    admin_table = _cli(live_server, "usage", "--tenant", "lc-cli", key=admin)
    assert "lc-cli" in admin_table
    assert "invalid_date" in _cli(live_server, "usage", "--start", "May", key=key, ok=False)

    assert "--yes" in _cli(live_server, "tenants", "delete", "lc-cli", key=admin, ok=False)
    assert json.loads(_cli(live_server, "tenants", "delete", "lc-cli", "--yes", key=admin))[
        "deleted"
    ]
    assert not key_works(live_server, key)

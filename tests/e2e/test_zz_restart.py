"""Restart persistence: stop the server, start it on the same data folder, nothing is lost.

Named to run after the other end-to-end tests of the session server; the server keeps its port,
so later tests use it as before."""

from __future__ import annotations

from support import adapter_archive
from test_tenant_lifecycle import key_works

MSG = [{"role": "user", "content": "Describe a mountain in one sentence."}]


def _greedy(client, model: str) -> str:
    out = client.chat.completions.create(model=model, messages=MSG, temperature=0, max_tokens=20)
    return out.choices[0].message.content


def _usage(server) -> dict:
    rows = server.admin("GET", "/v1/usage").json()["data"]
    return {
        (r["date"], r["tenant"], r["model"]): (
            r["requests"],
            r["prompt_tokens"],
            r["completion_tokens"],
        )
        for r in rows
    }


def _key_lifecycle(server) -> tuple[str, str, str]:
    """A tenant with a limit, a second key and its first key revoked; a deleted tenant."""
    revoked = server.create_tenant("zz-lifecycle", max_n=3)
    kept = server.admin("POST", "/v1/tenants/zz-lifecycle/keys", json={}).json()["api_key"]
    first_id = server.admin("GET", "/v1/tenants/zz-lifecycle/keys").json()["data"][0]["id"]
    assert server.admin("DELETE", f"/v1/tenants/zz-lifecycle/keys/{first_id}").status_code == 200
    gone = server.create_tenant("zz-gone")
    assert server.admin("DELETE", "/v1/tenants/zz-gone").status_code == 200
    return kept, revoked, gone


def test_restart_keeps_tenants_keys_and_adapters(live_server, adapter_dirs):
    import httpx

    key = live_server.create_tenant("persistent")
    upload = httpx.post(
        f"{live_server.base_url}/adapters",
        headers={"Authorization": f"Bearer {key}"},
        data={"name": "keeper"},
        files={"file": ("k.tar.gz", adapter_archive(adapter_dirs["c"]))},
        timeout=120,
    )
    assert upload.status_code == 201, upload.text
    before = _greedy(live_server.client(key), "keeper")
    static_before = _greedy(live_server.client(key), "a")
    listed_before = httpx.get(
        f"{live_server.base_url}/adapters", headers={"Authorization": f"Bearer {key}"}, timeout=30
    ).json()
    kept, revoked, gone = _key_lifecycle(live_server)
    usage_before = _usage(live_server)
    last = live_server.client(kept).chat.completions.create(
        model=live_server.base_model_name, messages=MSG, temperature=0, max_tokens=5
    )  # still in the ledger's buffer: written at shutdown at the latest

    live_server.restart()

    usage_after = _usage(live_server)
    [(day, tenant, model)] = set(usage_after) - set(usage_before)
    assert (tenant, model) == ("zz-lifecycle", live_server.base_model_name)
    assert usage_after.pop((day, tenant, model)) == (
        1,
        last.usage.prompt_tokens,
        last.usage.completion_tokens,
    )
    assert usage_after == usage_before
    assert key_works(live_server, kept)
    assert not key_works(live_server, revoked) and not key_works(live_server, gone)
    assert live_server.admin("GET", "/v1/tenants/zz-lifecycle").json()["max_n"] == 3
    assert live_server.admin("GET", "/v1/tenants/zz-gone").status_code == 404

    client = live_server.client(key)
    assert _greedy(client, "keeper") == before
    assert _greedy(client, "a") == static_before
    listed_after = httpx.get(
        f"{live_server.base_url}/adapters", headers={"Authorization": f"Bearer {key}"}, timeout=30
    ).json()
    assert listed_after == listed_before

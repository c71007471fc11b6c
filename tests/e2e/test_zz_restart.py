"""Restart persistence: stop the server, start it on the same data folder, nothing is lost.

Named to run after the other end-to-end tests of the session server; the server keeps its port,
so later tests use it as before."""

from __future__ import annotations

from support import adapter_archive

MSG = [{"role": "user", "content": "Describe a mountain in one sentence."}]


def _greedy(client, model: str) -> str:
    out = client.chat.completions.create(model=model, messages=MSG, temperature=0, max_tokens=20)
    return out.choices[0].message.content


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

    live_server.restart()

    client = live_server.client(key)
    assert _greedy(client, "keeper") == before
    assert _greedy(client, "a") == static_before
    listed_after = httpx.get(
        f"{live_server.base_url}/adapters", headers={"Authorization": f"Bearer {key}"}, timeout=30
    ).json()
    assert listed_after == listed_before

"""Tenants, keys, adapter upload, isolation, quotas, deletion and metrics, over real HTTP."""

from __future__ import annotations

import asyncio
import json
from functools import partial
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support import (
    adapter_archive,
    make_random_adapters,
    tar_gz_bytes,
    upload_archive,
    zip_bytes,
)

MSG = [{"role": "user", "content": "Name a fruit."}]


_upload = partial(upload_archive, timeout=120)


def _get(server, key: str | None, path: str) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.get(f"{server.base_url}{path}", headers=headers, timeout=30)


def _greedy(client, model: str) -> str:
    out = client.chat.completions.create(model=model, messages=MSG, temperature=0, max_tokens=16)
    return out.choices[0].message.content


@pytest.fixture(scope="module")
def tenants(live_server, adapter_dirs):
    """Two tenants, each with its own `support` adapter uploaded through the API."""
    alice = live_server.create_tenant("alice")
    bob = live_server.create_tenant("bob", max_adapters=3, max_bytes=40_000_000)
    for key, folder in ((alice, adapter_dirs["c"]), (bob, adapter_dirs["d"])):
        response = _upload(live_server, key, "support", adapter_archive(folder))
        assert response.status_code == 201, response.text
        assert response.json()["version"] == 1
    return {"alice": alice, "bob": bob}


def test_missing_and_wrong_keys_are_401(live_server, tenants):
    assert _get(live_server, None, "/models").status_code == 401
    response = _get(live_server, "tl-not-a-key", "/models")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        live_server.client("wrong").models.list()
    assert (
        httpx.post(f"{live_server.base_url}/tenants", json={"name": "x"}, timeout=10).status_code
        == 401
    )
    assert (
        httpx.post(
            f"{live_server.base_url}/tenants",
            json={"name": "x"},
            headers={"Authorization": f"Bearer {tenants['alice']}"},
            timeout=10,
        ).status_code
        == 403
    )


def test_same_name_two_tenants_serve_their_own_adapter(live_server, tenants):
    alice = live_server.client(tenants["alice"])
    bob = live_server.client(tenants["bob"])
    alice_text, bob_text = _greedy(alice, "support"), _greedy(bob, "support")
    assert alice_text != bob_text
    assert alice_text == _greedy(alice, "support@1")
    alice_models = {m.id: m.owned_by for m in alice.models.list().data}
    bob_models = {m.id: m.owned_by for m in bob.models.list().data}
    assert alice_models["support"] == "alice" and bob_models["support"] == "bob"
    assert "public" in alice_models.values()  # the static adapters are shared


def test_cross_tenant_use_list_and_delete_look_like_not_found(live_server, tenants, adapter_dirs):
    bob_key = tenants["bob"]
    response = _upload(
        live_server, tenants["alice"], "alice-only", adapter_archive(adapter_dirs["a"])
    )
    assert response.status_code == 201
    missing = _get(live_server, bob_key, "/adapters/definitely-missing")
    foreign = _get(live_server, bob_key, "/adapters/alice-only")
    assert foreign.status_code == missing.status_code == 404
    assert foreign.json()["error"]["code"] == missing.json()["error"]["code"]
    bob = live_server.client(bob_key)
    with pytest.raises(openai.NotFoundError) as err_foreign:
        _greedy(bob, "alice-only")
    with pytest.raises(openai.NotFoundError) as err_missing:
        _greedy(bob, "never-existed")
    assert err_foreign.value.body["code"] == err_missing.value.body["code"] == "model_not_found"
    assert "alice-only" not in [
        a["name"] for a in _get(live_server, bob_key, "/adapters").json()["data"]
    ]
    deleted = httpx.delete(
        f"{live_server.base_url}/adapters/alice-only",
        headers={"Authorization": f"Bearer {bob_key}"},
        timeout=30,
    )
    assert deleted.status_code == 404
    assert _greedy(live_server.client(tenants["alice"]), "alice-only")  # still there for alice
    # a tenant cannot delete the shared static adapters either
    shared = httpx.delete(
        f"{live_server.base_url}/adapters/a",
        headers={"Authorization": f"Bearer {bob_key}"},
        timeout=30,
    )
    assert shared.status_code == 404


def test_new_version_serves_latest_and_pinned(live_server, tenants, adapter_dirs):
    key = tenants["alice"]
    client = live_server.client(key)
    v1_text = _greedy(client, "support")
    response = _upload(live_server, key, "support", adapter_archive(adapter_dirs["b"]))
    assert response.status_code == 201 and response.json()["version"] == 2
    assert _greedy(client, "support@1") == v1_text
    latest = _greedy(client, "support")
    assert latest == _greedy(client, "support@2") and latest != v1_text
    versions = _get(live_server, key, "/adapters/support").json()["versions"]
    assert [v["version"] for v in versions] == [1, 2]


def _bad_uploads(folder: Path, tmp: Path) -> dict[str, tuple[bytes, int, str]]:
    config = json.loads((folder / "adapter_config.json").read_text())
    weights = folder / "adapter_model.safetensors"

    def with_config(**changes) -> bytes:
        return tar_gz_bytes(
            {
                "adapter_config.json": json.dumps({**config, **changes}).encode(),
                "adapter_model.safetensors": weights,
            }
        )

    return {
        "pickle": (tar_gz_bytes({"adapter_config.json": folder / "adapter_config.json", "adapter_model.bin": b"\x80\x04pickle"}), 400, "pickle_weights_refused"),
        "bad-json": (tar_gz_bytes({"adapter_config.json": b"{oops", "adapter_model.safetensors": weights}), 400, "invalid_config"),
        "not-lora": (with_config(peft_type="IA3"), 400, "not_a_lora_adapter"),
        "rank": (with_config(r=64), 400, "rank_too_large"),
        "targets": (with_config(target_modules=["lm_head"]), 400, "unsupported_target_modules"),
        "corrupt": (tar_gz_bytes({"adapter_config.json": folder / "adapter_config.json", "adapter_model.safetensors": b"garbage" * 100}), 400, "corrupt_weights"),
        "abs-path": (tar_gz_bytes({"/tmp/adapter_config.json": b"{}"}), 400, "unsafe_archive"),
        "dotdot": (zip_bytes({"../adapter_config.json": b"{}"}), 400, "unsafe_archive"),
        "link": (tar_gz_bytes({"adapter_config.json": b"{}"}, symlinks={"adapter_model.safetensors": "/etc/passwd"}), 400, "unsafe_archive"),
        "exe": (tar_gz_bytes({"adapter_config.json": b"{}", "adapter_model.safetensors": weights, "install.sh": b"#!/bin/sh"}), 400, "unexpected_file"),
        "not-archive": (b"plain bytes, not an archive", 400, "invalid_archive"),
        "bad name": (adapter_archive(folder), 400, "invalid_name"),
    }  # fmt: skip


def test_bad_uploads_are_refused_and_nothing_is_stored(
    live_server, tenants, adapter_dirs, tmp_path
):
    key = tenants["bob"]
    before = _get(live_server, key, "/adapters").json()["data"]
    store = live_server.data_dir / "adapters"
    files_before = sorted(p for p in store.rglob("*") if p.is_file())
    for name, (data, status, code) in _bad_uploads(adapter_dirs["a"], tmp_path).items():
        response = _upload(live_server, key, name, data)
        assert response.status_code == status, (name, response.text)
        assert response.json()["error"]["code"] == code, (name, response.json())
    # an adapter for another base model: same module names, wrong shapes
    other_base = _other_base_adapter(live_server, tmp_path)
    response = _upload(live_server, key, "other-base", adapter_archive(other_base))
    assert response.status_code == 400 and response.json()["error"]["code"] == "base_model_mismatch"
    assert _get(live_server, key, "/adapters").json()["data"] == before
    assert sorted(p for p in store.rglob("*") if p.is_file()) == files_before
    assert _greedy(live_server.client(key), "support")  # still serving


def _other_base_adapter(live_server, tmp_path: Path) -> Path:
    """A real PEFT adapter for a different (tiny) Llama: same names, other shapes."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tiny = LlamaForCausalLM(
        LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=1000)
    )  # fmt: skip
    model = get_peft_model(tiny, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    out = tmp_path / "other-base"
    model.save_pretrained(out)
    return out


def test_quotas(live_server, tenants, adapter_dirs):
    key = tenants["bob"]  # max 3 versions, 40 MB; it holds `support` already
    assert _upload(live_server, key, "q1", adapter_archive(adapter_dirs["a"])).status_code == 201
    assert _upload(live_server, key, "q2", adapter_archive(adapter_dirs["b"])).status_code == 201
    refused = _upload(live_server, key, "q3", adapter_archive(adapter_dirs["c"]))
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "quota_exceeded"
    for name in ("q1", "q2"):
        assert (
            httpx.delete(
                f"{live_server.base_url}/adapters/{name}",
                headers={"Authorization": f"Bearer {key}"},
                timeout=30,
            ).status_code
            == 200
        )


def test_concurrent_uploads_and_requests(live_server, tenants, adapter_dirs, tmp_path):
    """Uploads and generations at the same time: none fails, every adapter is there after."""
    key = tenants["alice"]
    folders = make_random_adapters(
        live_server.base_model, {tmp_path / f"conc{i}": 100 + i for i in range(3)}
    )

    async def run():
        client = live_server.async_client(key)
        async with httpx.AsyncClient(timeout=300) as http:

            async def upload(i: int, folder: Path):
                return await http.post(
                    f"{live_server.base_url}/adapters",
                    headers={"Authorization": f"Bearer {key}"},
                    data={"name": f"conc{i}"},
                    files={"file": ("a.tar.gz", adapter_archive(folder))},
                )

            async def generate(model: str):
                out = await client.chat.completions.create(
                    model=model, messages=MSG, temperature=0, max_tokens=8
                )
                return out.choices[0].message.content

            uploads = [upload(i, f) for i, f in enumerate(folders)]
            requests = [generate(m) for m in ["support", "a", "b", "support", "a", "b"]]
            return await asyncio.gather(*uploads, *requests)

    results = asyncio.run(run())
    assert [r.status_code for r in results[:3]] == [201, 201, 201]
    assert all(isinstance(t, str) and t for t in results[3:])
    names = {a["name"] for a in _get(live_server, key, "/adapters").json()["data"]}
    assert {"conc0", "conc1", "conc2", "support"} <= names
    texts = {_greedy(live_server.client(key), f"conc{i}") for i in range(3)}
    assert len(texts) == 3


def test_delete_while_in_flight(live_server, tenants, adapter_dirs):
    """A request already running finishes; later ones get 404; the engine drops the adapter."""
    key = tenants["alice"]
    assert (
        _upload(live_server, key, "doomed", adapter_archive(adapter_dirs["d"])).status_code == 201
    )
    client = live_server.client(key)
    stream = client.chat.completions.create(
        model="doomed", messages=MSG, temperature=0, max_tokens=64, stream=True
    )
    first = next(iter(stream))  # the request is running in the engine
    deleted = httpx.delete(
        f"{live_server.base_url}/adapters/doomed",
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
    )
    assert deleted.status_code == 200
    rest = list(stream)
    text = (first.choices[0].delta.content or "") + "".join(
        c.choices[0].delta.content or "" for c in rest if c.choices
    )
    assert text and rest[-1].choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.NotFoundError):
        _greedy(client, "doomed")


def _samples(server) -> dict[tuple[str, tuple], float]:
    text = server.admin("GET", "/metrics").text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_move_by_the_right_amounts(live_server, tenants):
    key = tenants["bob"]
    client = live_server.client(key)
    before = _samples(live_server)
    out = client.chat.completions.create(model="support", messages=MSG, temperature=0, max_tokens=5)
    streamed = list(
        client.chat.completions.create(
            model="support", messages=MSG, temperature=0, max_tokens=5, stream=True
        )
    )
    with pytest.raises(openai.NotFoundError):
        _greedy(client, "nope")
    after = _samples(live_server)

    def delta(name: str, **labels) -> float:
        k = (name, tuple(sorted(labels.items())))
        return after.get(k, 0.0) - before.get(k, 0.0)

    who = {"tenant": "bob", "adapter": "support@1"}
    assert delta("tenantlora_requests_total", route="chat", status="200", **who) == 2
    assert (
        delta("tenantlora_requests_total", route="chat", status="404", tenant="bob", adapter="none")
        == 1
    )
    assert delta("tenantlora_completion_tokens_total", **who) == 2 * out.usage.completion_tokens
    assert delta("tenantlora_prompt_tokens_total", **who) == 2 * out.usage.prompt_tokens
    assert delta("tenantlora_request_latency_seconds_count", **who) == 2
    assert delta("tenantlora_time_to_first_token_seconds_count", **who) == 2
    assert delta("tenantlora_time_per_output_token_seconds_count", **who) == 2
    assert len([c for c in streamed if c.choices]) >= 1
    assert after[("tenantlora_adapters_resident", ())] >= 1
    assert after[("tenantlora_process_tree_resident_memory_bytes", ())] > 100e6
    assert any(name.startswith("vllm:") for name, _ in after)  # vLLM's engine metrics too
    loads = [v for (n, _), v in after.items() if n == "tenantlora_adapter_loads_total"]
    assert sum(loads) >= 2


def _cli(live_server, *args: str, key: str) -> str:
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "serving.cli", *args, "--url", live_server.url, "--key", key],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_command_line_client(live_server, adapter_dirs):
    created = json.loads(
        _cli(live_server, "tenants", "create", "cli-tenant", key=live_server.admin_key)
    )
    key = created["api_key"]
    added = json.loads(
        _cli(live_server, "adapters", "add", "from-cli", str(adapter_dirs["b"]), key=key)
    )
    assert added["id"] == "from-cli@1" and added["owner"] == "cli-tenant"
    assert "from-cli@1" in _cli(live_server, "adapters", "list", key=key)
    assert _greedy(live_server.client(key), "from-cli")
    assert json.loads(_cli(live_server, "adapters", "rm", "from-cli", key=key))["deleted"] is True
    assert "from-cli" not in _cli(live_server, "adapters", "list", key=key)

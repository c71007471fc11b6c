"""The OpenAI-compatible API through the official `openai` client, on the real engine."""

from __future__ import annotations

import asyncio

import httpx
import openai
import psutil
import pytest

PROMPT = "Write one sentence about the sea."
CHAT = [{"role": "user", "content": PROMPT}]
GREEDY = {"temperature": 0, "max_tokens": 24}


def test_models_lists_base_and_both_adapters(live_server, tenant_key):
    ids = [m.id for m in live_server.client(tenant_key).models.list().data]
    assert ids[0] == live_server.base_model_name
    assert {"a", "b"} <= set(ids)


@pytest.mark.parametrize("model", ["base", "a", "b"])
def test_chat_and_completion_streamed_and_not(live_server, tenant_key, model):
    client = live_server.client(tenant_key)
    name = live_server.base_model_name if model == "base" else model

    chat = client.chat.completions.create(model=name, messages=CHAT, **GREEDY)
    assert chat.model == name
    assert chat.choices[0].message.content.strip()
    assert chat.usage.completion_tokens > 0 and chat.usage.prompt_tokens > 0

    stream = client.chat.completions.create(
        model=name, messages=CHAT, stream=True, stream_options={"include_usage": True}, **GREEDY
    )
    chunks = list(stream)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len([c for c in chunks if c.choices]) > 1  # really streamed, token by token
    assert streamed == chat.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens

    completion = client.completions.create(model=name, prompt="The sea is", **GREEDY)
    assert completion.choices[0].text.strip()
    pieces = list(client.completions.create(model=name, prompt="The sea is", stream=True, **GREEDY))
    assert "".join(p.choices[0].text for p in pieces) == completion.choices[0].text


def test_sampling_parameters(live_server, tenant_key):
    client = live_server.client(tenant_key)
    kwargs = {"model": "a", "prompt": "List three colours:", "max_tokens": 16}
    two = client.completions.create(n=2, temperature=1.0, top_p=0.9, seed=7, **kwargs)
    assert len(two.choices) == 2
    again = client.completions.create(n=2, temperature=1.0, top_p=0.9, seed=7, **kwargs)
    assert [c.text for c in again.choices] == [c.text for c in two.choices]  # seeded
    stopped = client.completions.create(temperature=0, stop=[" "], **kwargs)
    assert " " not in stopped.choices[0].text.strip()
    assert stopped.choices[0].finish_reason == "stop"
    short = client.completions.create(temperature=0, **{**kwargs, "max_tokens": 3})
    assert short.usage.completion_tokens == 3 and short.choices[0].finish_reason == "length"


async def _chat(client, model: str) -> str:
    out = await client.chat.completions.create(model=model, messages=CHAT, **GREEDY)
    return out.choices[0].message.content


def test_mixed_batch_matches_solo_and_adapters_differ(live_server, tenant_key):
    """Greedy text for adapter `a` is the same alone as in a batch with `b` and the base."""
    base = live_server.base_model_name

    async def run():
        client = live_server.async_client(tenant_key)
        solo_a = await _chat(client, "a")
        mixed = await asyncio.gather(*[_chat(client, m) for m in ["a", "b", base, "a", "b", base]])
        return solo_a, mixed

    solo_a, mixed = asyncio.run(run())
    a1, b1, base1, a2, b2, base2 = mixed
    assert a1 == solo_a and a2 == solo_a
    assert b1 == b2 and base1 == base2
    assert len({solo_a, b1, base1}) == 3, (solo_a, b1, base1)


def test_more_adapters_than_max_loras_cycle_correctly(live_server, tenant_key, adapter_dirs):
    """max_loras=2 and max_cpu_loras=3, four adapters: vLLM must swap them in and out, and each
    adapter's greedy output must stay the same on every visit."""
    live_server.register_adapter("c", adapter_dirs["c"])
    live_server.register_adapter("d", adapter_dirs["d"])
    names = ["a", "b", "c", "d"]

    async def run():
        client = live_server.async_client(tenant_key)
        first = {m: await _chat(client, m) for m in names}
        rounds = [await asyncio.gather(*[_chat(client, m) for m in names]) for _ in range(2)]
        reverse = {m: await _chat(client, m) for m in reversed(names)}
        return first, rounds, reverse

    first, rounds, reverse = asyncio.run(run())
    assert len(set(first.values())) == 4
    for outputs in rounds:
        assert dict(zip(names, outputs, strict=True)) == first
    assert reverse == first


def _post(live_server, key, path, content, content_type="application/json"):
    return httpx.post(
        f"{live_server.base_url}{path}",
        content=content,
        headers={"Authorization": f"Bearer {key}", "content-type": content_type},
        timeout=60,
    )


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"{not json", 400, "invalid_json"),
        (b'["a list"]', 400, "invalid_json"),
        (b'{"model": "nope", "messages": [{"role": "user", "content": "hi"}]}', 404, "model_not_found"),
        (b'{"model": "a", "messages": "hi"}', 400, "invalid_request"),
        (b'{"model": "a", "messages": [{"role": "user", "content": "hi"}], "temperature": -1}', 400, "invalid_temperature"),
        (b'{"model": "a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}', 400, "invalid_max_tokens"),
    ],
)  # fmt: skip
def test_bad_requests_get_openai_errors(live_server, tenant_key, body, status, code):
    response = _post(live_server, tenant_key, "/chat/completions", body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert error["message"] and error["type"]


def test_prompt_longer_than_context_is_400_and_server_keeps_serving(live_server, tenant_key):
    client = live_server.client(tenant_key)
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="a", prompt="hello " * 1500, max_tokens=4)
    assert err.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="missing", messages=CHAT, max_tokens=4)
    wrong_type = _post(live_server, tenant_key, "/completions", b"prompt=hi", "text/plain")
    assert wrong_type.status_code == 415
    ok = client.chat.completions.create(model="a", messages=CHAT, **GREEDY)
    assert ok.choices[0].message.content
    assert httpx.get(f"{live_server.url}/health", timeout=10).json()["status"] == "ok"


def test_engine_core_runs_the_model_without_a_worker_process(live_server, tenant_key):
    """On a CPU the engine core runs the model itself (serving.vllm_compat.in_process_executor):
    the server's process tree has vLLM's engine core and no worker process beside it."""
    r = live_server.client(tenant_key).completions.create(
        model=live_server.base_model_name, prompt="Hello", max_tokens=2, temperature=0
    )
    assert r.usage.completion_tokens == 2
    names = [p.name() for p in psutil.Process(live_server.proc.pid).children(recursive=True)]
    assert any("EngineCore" in n for n in names), names
    assert not any("Worker" in n for n in names), names

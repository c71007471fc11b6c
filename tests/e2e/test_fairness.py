"""Fair sharing and per-tenant limits (issue 11), over real HTTP with the real engine.

Most tests use the session's shared server and set each tenant's limits through the admin API;
the Redis test starts two servers of its own on one registry and one Redis."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from conftest import ServerProcess
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.engine

MSG = [{"role": "user", "content": "Count from one to ten."}]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _chat(server, key: str, max_tokens: int = 4, **extra) -> httpx.Response:
    body = {"model": server.base_model_name, "messages": MSG, "max_tokens": max_tokens, **extra}
    return httpx.post(
        f"{server.base_url}/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json=body,
        timeout=300,
    )


def _gauge(server, name: str, tenant: str) -> float:
    page = server.admin("GET", "/metrics")
    assert page.status_code == 200
    for family in text_string_to_metric_families(page.text):
        for sample in family.samples:
            if sample.name == name and sample.labels.get("tenant") == tenant:
                return sample.value
    return 0.0


def _assert_rate_limited(response: httpx.Response) -> None:
    assert response.status_code == 429, response.text
    assert response.json()["error"]["code"] == "rate_limit_exceeded"
    assert int(response.headers["retry-after"]) >= 1


async def _wait_for(predicate, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.2)


@pytest.mark.anyio
async def test_max_concurrency_one_refuses_the_second_while_others_are_served(live_server):
    capped_key = live_server.create_tenant("fair-capped", max_concurrent=1)
    other_key = live_server.create_tenant("fair-other")
    async with (
        live_server.async_client(capped_key) as capped,
        live_server.async_client(other_key) as other,
    ):
        await _one_refused_while_another_is_served(live_server, capped, other, capped_key)


async def _one_refused_while_another_is_served(live_server, capped, other, capped_key) -> None:
    base = live_server.base_model_name
    first = asyncio.create_task(
        capped.chat.completions.create(
            model=base, messages=MSG, max_tokens=96, extra_body={"ignore_eos": True}
        )
    )
    await _wait_for(lambda: _gauge(live_server, "tenantlora_admission_in_flight", "fair-capped"))

    second = await asyncio.to_thread(_chat, live_server, capped_key)
    _assert_rate_limited(second)
    assert "concurrent" in second.json()["error"]["message"]
    served = await other.chat.completions.create(model=base, messages=MSG, max_tokens=4)
    assert served.choices[0].message.content
    assert not first.done()  # the other tenant was served while the first still ran

    assert (await first).usage.completion_tokens == 96
    after = await asyncio.to_thread(_chat, live_server, capped_key)
    assert after.status_code == 200, after.text


def test_requests_and_tokens_per_minute_refuse_then_recover(live_server):
    rpm = live_server.create_tenant("fair-rpm", requests_per_minute=2)
    tpm = live_server.create_tenant("fair-tpm", tokens_per_minute=300)

    one = _chat(live_server, rpm)
    assert one.status_code == 200, one.text
    assert one.headers["x-ratelimit-limit-requests"] == "2"
    assert one.headers["x-ratelimit-remaining-requests"] == "1"
    assert one.headers["x-ratelimit-reset-requests"].endswith("s")
    assert _chat(live_server, rpm).headers["x-ratelimit-remaining-requests"] == "0"
    refused = _chat(live_server, rpm)
    _assert_rate_limited(refused)
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"

    # Tokens: the estimate (prompt + max_tokens) is charged, then settled to the real count.
    if time.time() % 60 > 30:  # the counters' windows start on the minute: stay inside one
        time.sleep(61 - time.time() % 60)
    window = int(time.time() // 60)
    big = _chat(live_server, tpm, max_tokens=200)
    small = _chat(live_server, tpm, max_tokens=1)
    assert int(time.time() // 60) == window, "two requests took over 30 s; machine too busy"
    assert big.status_code == 200 and small.status_code == 200, (big.text, small.text)
    assert big.headers["x-ratelimit-limit-tokens"] == "300"
    used = big.json()["usage"]["total_tokens"]
    small_estimate = 300 - int(big.headers["x-ratelimit-remaining-tokens"]) - 200 + 1
    # Remaining after `small` = limit - real tokens of `big` - estimate of `small`: the settle.
    assert int(small.headers["x-ratelimit-remaining-tokens"]) == 300 - used - small_estimate
    _assert_rate_limited(_chat(live_server, tpm, max_tokens=200))

    # Both recover once their window has passed (sliding window counters: within two minutes).
    deadline = time.monotonic() + 150
    pending = {"rpm": (rpm, 1), "tpm": (tpm, 200)}
    while pending:
        assert time.monotonic() < deadline, f"still refused: {sorted(pending)}"
        time.sleep(5)
        for name, (key, tokens) in list(pending.items()):
            if _chat(live_server, key, max_tokens=tokens).status_code == 200:
                del pending[name]


@pytest.mark.anyio
async def test_a_quiet_tenant_goes_ahead_of_a_flood(live_server):
    """With tenant A's flood filling the engine's admission slots and queued behind them, B's
    request completes before every A request that was queued when B sent it."""
    async with (
        live_server.async_client(live_server.create_tenant("fair-flood")) as flood,
        live_server.async_client(live_server.create_tenant("fair-quiet")) as quiet,
    ):
        await _quiet_goes_ahead(live_server, flood, quiet)


async def _quiet_goes_ahead(live_server, flood, quiet) -> None:
    base = live_server.base_model_name
    finished: dict[str, float] = {}

    async def send(client, label: str, tokens: int) -> None:
        await client.chat.completions.create(
            model=base, messages=MSG, max_tokens=tokens, extra_body={"ignore_eos": True}
        )
        finished[label] = time.monotonic()

    # Staggered lengths, so slots free one at a time rather than all at once.
    flood_tasks = [asyncio.create_task(send(flood, f"a{i}", 16 + (i * 7) % 48)) for i in range(40)]
    await _wait_for(lambda: _gauge(live_server, "tenantlora_admission_queued", "fair-flood") >= 16)
    queued = int(_gauge(live_server, "tenantlora_admission_queued", "fair-flood"))
    await send(quiet, "b", 8)
    await asyncio.gather(*flood_tasks)
    after_b = sum(1 for label, t in finished.items() if label != "b" and t > finished["b"])
    assert after_b >= queued, f"{after_b} of A's requests finished after B; {queued} were queued"


def test_bad_limits_are_400_and_good_ones_apply(live_server):
    key = live_server.create_tenant("fair-patched")
    for bad in (
        {"max_concurrent": 0},
        {"requests_per_minute": -5},
        {"tokens_per_minute": "many"},
        {"weight": 0},
        {"max_n": 1.5},
    ):
        response = live_server.admin("PATCH", "/v1/tenants/fair-patched", json=bad)
        assert response.status_code == 400, (bad, response.text)
        assert response.json()["error"]["type"] == "invalid_request_error"

    patched = live_server.admin("PATCH", "/v1/tenants/fair-patched", json={"max_n": 2})
    assert patched.status_code == 200, patched.text
    too_many = _chat(live_server, key, n=3)
    assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "n"
    assert _chat(live_server, key, n=2).status_code == 200
    live_server.admin("PATCH", "/v1/tenants/fair-patched", json={"max_prompts": 2})
    prompts = httpx.post(
        f"{live_server.base_url}/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": live_server.base_model_name, "prompt": ["a", "b", "c"], "max_tokens": 1},
        timeout=60,
    )
    assert prompts.status_code == 400 and prompts.json()["error"]["param"] == "prompt"


def test_limits_hold_across_two_servers_on_redis_and_a_restart(
    base_model_path, redis_url, tmp_path
):
    args = ["--max-model-len", "512", "--max-num-seqs", "4", "--kv-cache-gib", "0.25"]
    servers = [
        ServerProcess(tmp_path, base_model_path, args, tmp_path / f"server{i}.log") for i in (1, 2)
    ]
    for server in servers:
        server.env["TENANTLORA_RATE_LIMIT_STORAGE"] = redis_url
    try:
        for server in servers:
            server.start()
        one, two = servers
        key = one.create_tenant("fair-shared", requests_per_minute=4)
        # One budget over both servers: each answer counts the other server's requests.
        remaining = [
            _chat(server, key, max_tokens=1).headers["x-ratelimit-remaining-requests"]
            for server in (one, two, one, two)
        ]
        assert remaining == ["3", "2", "1", "0"]
        _assert_rate_limited(_chat(one, key, max_tokens=1))
        _assert_rate_limited(_chat(two, key, max_tokens=1))

        # After a restart the tenant's limit still holds (the registry keeps it, Redis the count).
        two.restart()
        statuses = []
        for _ in range(5):
            response = _chat(two, key, max_tokens=1)
            statuses.append(response.status_code)
            if response.status_code == 429:
                break
            assert response.headers["x-ratelimit-limit-requests"] == "4"
        assert statuses[-1] == 429, statuses
    finally:
        for server in servers:
            server.stop()

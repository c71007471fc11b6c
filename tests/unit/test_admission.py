"""Admission (serving.admission): caps, concurrency, rate limits on memory and on a real Redis,
headers, priorities and the fair queue, with vLLM's real request models and no engine."""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid

import pytest
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.openai.completion.protocol import CompletionRequest

from adapters.registry import Tenant
from serving.admission import Admission, request_size
from serving.errors import APIError
from serving.rate_limits import duration
from serving.settings import Settings

pytestmark = pytest.mark.anyio
WINDOW = 2  # seconds: the tests' stand-in for a minute
_ids = itertools.count(uuid.uuid4().int % 10**9)  # fresh counters on a long-lived Redis


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(params=["memory", "redis"])
def storage(request) -> str:
    """Counters in process memory, or on a real Redis (the session's `redis_url` fixture)."""
    return "memory://" if request.param == "memory" else request.getfixturevalue("redis_url")


def tenant(**limits) -> Tenant:
    tid = next(_ids)
    return Tenant(tid, f"t{tid}", 64, 2**30, time.time(), **limits)


def chat(max_tokens: int = 10, n: int = 1, text: str = "hello there") -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": [{"role": "user", "content": text}],
            "max_completion_tokens": max_tokens,
            "n": n,
        }
    )


def completion(prompt, max_tokens: int = 10, n: int = 1) -> CompletionRequest:
    return CompletionRequest.model_validate(
        {"model": "m", "prompt": prompt, "max_tokens": max_tokens, "n": n}
    )


def admission(storage: str = "memory://", **settings) -> Admission:
    return Admission(Settings(rate_limit_storage=storage, **settings), window_seconds=WINDOW)


# ---- request size -----------------------------------------------------------------------------


def test_request_size_chat_and_completions():
    size = request_size(chat(max_tokens=50, n=2, text="x" * 40), max_model_len=1024)
    assert (size.prompts, size.n, size.prompt_tokens, size.completion_tokens) == (1, 2, 14, 100)
    size = request_size(completion(["ab" * 8, "c" * 9, "d"], max_tokens=5), 1024)
    assert (size.prompts, size.prompt_tokens, size.completion_tokens) == (3, 4 + 3 + 1, 15)
    size = request_size(completion([[1, 2, 3], [4, 5]], max_tokens=5), 1024)
    assert (size.prompts, size.prompt_tokens) == (2, 5)
    assert request_size(completion([1, 2, 3, 4]), 100).completion_tokens == 10
    # No max tokens: the request may fill the context.
    no_max = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "x" * 16}]}
    )
    assert request_size(no_max, 100).completion_tokens == 100 - 8


def test_reset_duration_format():
    assert [duration(s) for s in (0.25, 1, 12.2, 360)] == ["250ms", "1s", "13s", "6m0s"]


# ---- caps and limits --------------------------------------------------------------------------


async def test_n_and_prompt_caps_are_400(storage):
    adm = admission(storage, tenant_max_n=4, tenant_max_prompts=2)
    with pytest.raises(APIError) as err:
        await adm.admit(tenant(), chat(n=5))
    assert (err.value.status, err.value.code, err.value.param) == (400, "invalid_n", "n")
    with pytest.raises(APIError) as err:
        await adm.admit(tenant(), completion(["a", "b", "c"]))
    assert (err.value.status, err.value.param) == (400, "prompt")
    # The tenant's own override wins over the server default.
    (await adm.admit(tenant(max_n=8), chat(n=8))).release()


async def test_concurrency_limit_is_429_and_frees_on_release(storage):
    adm = admission(storage)
    capped, other = tenant(max_concurrent=1), tenant()
    first = await adm.admit(capped, chat())
    with pytest.raises(APIError) as err:
        await adm.admit(capped, chat())
    assert err.value.status == 429 and err.value.code == "rate_limit_exceeded"
    assert int(err.value.headers["Retry-After"]) >= 1
    (await adm.admit(other, chat())).release()  # another tenant is served meanwhile
    first.release()
    first.release()  # idempotent
    (await adm.admit(capped, chat())).release()
    assert adm.in_flight(capped.name) == 0 and adm.queue.in_flight == 0


async def test_concurrent_admissions_cannot_both_pass_the_cap(storage):
    adm = admission(storage)
    capped = tenant(max_concurrent=1, requests_per_minute=100)
    results = await asyncio.gather(
        *(adm.admit(capped, chat()) for _ in range(3)), return_exceptions=True
    )
    tickets = [r for r in results if not isinstance(r, BaseException)]
    assert len(tickets) == 1 and all(isinstance(r, APIError) for r in results if r not in tickets)


async def test_requests_per_window_refuse_then_recover(storage):
    adm = admission(storage)
    t = tenant(requests_per_minute=2)
    first = await adm.admit(t, chat())
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    assert "x-ratelimit-reset-requests" in first.headers
    assert "x-ratelimit-limit-tokens" not in first.headers  # no token limit set
    (await adm.admit(t, chat())).release()
    with pytest.raises(APIError) as err:
        await adm.admit(t, chat())
    assert err.value.status == 429 and "2 requests per" in err.value.message
    assert err.value.headers["x-ratelimit-remaining-requests"] == "0"
    assert 1 <= int(err.value.headers["Retry-After"]) <= WINDOW
    first.release()  # releasing does not give back the request: it was served
    with pytest.raises(APIError):
        await adm.admit(t, chat())
    await _wait_until_admitted(adm, t, chat(), 2.5 * WINDOW)


async def test_tokens_per_window_refuse_settle_and_recover(storage):
    adm = admission(storage)
    t = tenant(tokens_per_minute=100)
    ticket = await adm.admit(t, chat(max_tokens=60))  # ~7 prompt + 60 tokens
    assert ticket.headers["x-ratelimit-limit-tokens"] == "100"
    assert 30 <= int(ticket.headers["x-ratelimit-remaining-tokens"]) <= 40
    with pytest.raises(APIError) as err:
        await adm.admit(t, chat(max_tokens=60))
    assert err.value.status == 429 and "100 tokens per" in err.value.message
    ticket.settle(prompt_tokens=7, completion_tokens=3)  # it used far fewer than it asked for
    ticket.release()
    await adm.flush()
    again = await adm.admit(t, chat(max_tokens=60))  # the refund made room
    assert int(again.headers["x-ratelimit-remaining-tokens"]) <= 30
    again.release()
    with pytest.raises(APIError) as err:
        await adm.admit(t, chat(max_tokens=200))
    assert "Request too large" in err.value.message


async def test_refused_by_tokens_gives_back_the_request(storage):
    adm = admission(storage)
    t = tenant(requests_per_minute=2, tokens_per_minute=50)
    with pytest.raises(APIError):
        await adm.admit(t, chat(max_tokens=100))
    ok = await adm.admit(t, chat(max_tokens=10))
    assert ok.headers["x-ratelimit-remaining-requests"] == "1"
    ok.release()


async def test_rate_limits_are_shared_by_two_replicas_on_redis(redis_url):
    one, two = admission(redis_url), admission(redis_url)
    t = tenant(requests_per_minute=3)
    for adm in (one, two, one):
        (await adm.admit(t, chat())).release()
    for adm in (one, two):
        with pytest.raises(APIError):
            await adm.admit(t, chat())


async def test_memory_limits_are_per_process():
    one, two = admission(), admission()
    t = tenant(requests_per_minute=1)
    (await one.admit(t, chat())).release()
    (await two.admit(t, chat())).release()


# ---- fair queue and priorities ----------------------------------------------------------------


async def test_light_tenant_skips_a_backlog_and_gets_the_lower_priority(storage):
    """A tenant below its fair share of engine slots is admitted at once, past the queue's
    capacity (up to the burst ceiling), while another tenant's backlog keeps waiting."""
    adm = admission(storage, admission_max_in_flight=2)
    flood, quiet = tenant(), tenant()
    running = [await adm.admit(flood, chat()) for _ in range(2)]
    assert [t.priority for t in running] == [0, 1]
    order: list[str] = []

    async def send(label, who):
        ticket = await adm.admit(who, chat())
        order.append(label)
        return ticket

    queued = [asyncio.create_task(send(f"a{i}", flood)) for i in range(3)]
    await asyncio.sleep(0.05)
    late = asyncio.create_task(send("b", quiet))
    await asyncio.sleep(0.05)
    assert order == ["b"]  # the flood's three still wait; the quiet tenant did not
    b = await late
    assert b.priority == 0 and b.queue_wait == 0 and adm.queue.in_flight == 3
    b.release()
    running.pop(0).release()
    a0 = await queued[0]
    assert a0.priority == 1  # one of its own already in the engine
    for ticket in [*running, a0]:
        ticket.release()
    for ticket in await asyncio.gather(*queued[1:]):
        ticket.release()
    assert adm.queue.in_flight == 0


async def test_weight_lowers_priority_numbers(storage):
    adm = admission(storage)
    heavy = tenant(weight=4.0)
    tickets = [await adm.admit(heavy, chat()) for _ in range(5)]
    assert [t.priority for t in tickets] == [0, 0, 0, 0, 1]
    for t in tickets:
        t.release()


async def test_queue_full_and_timeout_are_429_and_refund(storage):
    adm = admission(
        storage, admission_max_in_flight=1, admission_queue_size=1, admission_queue_timeout=0.2
    )
    t = tenant(requests_per_minute=10)
    held = await adm.admit(t, chat())
    with pytest.raises(APIError) as err:  # waits 0.2 s in the queue, then gives up
        await adm.admit(t, chat())
    assert err.value.status == 429 and err.value.headers["Retry-After"] == "5"
    waiter = asyncio.create_task(adm.admit(t, chat()))
    await asyncio.sleep(0.05)
    with pytest.raises(APIError) as err:  # the queue (size 1) is full
        await adm.admit(t, chat())
    assert err.value.status == 429 and err.value.headers["Retry-After"] == "1"
    waiter.cancel()  # the client went away while queued
    with pytest.raises(asyncio.CancelledError):
        await waiter
    await adm.flush()
    assert adm.queue.waiting() == 0
    # Refused and cancelled requests gave their request back: only `held` counts.
    again = await asyncio.wait_for(_admit_after_release(adm, t, held), 5)
    assert again.headers["x-ratelimit-remaining-requests"] == "8"
    again.release()


async def _admit_after_release(adm: Admission, t, held):
    held.release()
    return await adm.admit(t, chat())


async def _wait_until_admitted(adm: Admission, t, request, within: float) -> None:
    deadline = time.monotonic() + within
    while True:
        try:
            (await adm.admit(t, request)).release()
            return
        except APIError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


# ---- metrics ----------------------------------------------------------------------------------


def _sample(name: str, **labels) -> float | None:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name, labels)


async def test_metrics_by_tenant():
    adm = admission(admission_max_in_flight=1)
    t = tenant(max_concurrent=1)
    refused = "tenantlora_admission_refused_total"
    ticket = await adm.admit(t, chat(max_tokens=10))
    assert _sample(refused, tenant=t.name, reason="concurrency") == 0  # exported before any
    assert _sample("tenantlora_admission_in_flight", tenant=t.name) == 1
    assert _sample("tenantlora_admission_tokens_total", tenant=t.name) == 17  # 4 + 11/4 + 10 max
    assert _sample("tenantlora_admission_queue_wait_seconds_count", tenant=t.name) == 1
    with pytest.raises(APIError):
        await adm.admit(t, chat())
    assert _sample(refused, tenant=t.name, reason="concurrency") == 1
    ticket.release()
    assert _sample("tenantlora_admission_in_flight", tenant=t.name) == 0
    adm.forget_tenant(t.name)
    assert _sample(refused, tenant=t.name, reason="concurrency") is None


async def test_every_dashboard_series_exists_from_a_tenants_first_request(storage):
    """The Grafana panels read queued, in flight, queue wait, tokens and refusals per tenant:
    each series exists once a tenant was admitted, also when it never had to queue."""
    from prometheus_client import REGISTRY

    adm = admission(storage)
    quiet = tenant()
    ticket = await adm.admit(quiet, chat())
    ticket.release()
    for name in (
        "tenantlora_admission_queued",
        "tenantlora_admission_in_flight",
        "tenantlora_admission_queue_wait_seconds_count",
        "tenantlora_admission_tokens_total",
        "tenantlora_admission_refused_total",
    ):
        labels = {"tenant": quiet.name}
        if name.endswith("refused_total"):
            labels["reason"] = "concurrency"
        assert REGISTRY.get_sample_value(name, labels) is not None, name

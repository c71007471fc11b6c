"""The request path's lease is released exactly once on every path, without an engine.

The app is the real one (routes, auth, resolver, lease, JSON limits); only vLLM's engine and
serving objects are replaced by small fakes, so client disconnects can be driven byte by byte
through raw ASGI messages: before the first byte, mid-stream, while a non-streaming request
is still running, and the normal ends."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any

import pytest
from fastapi import FastAPI

from adapters.registry import AdapterVersion, Tenant
from serving.auth import Authenticator
from serving.engine import AdapterLifecycle
from serving.engine_headers import ENGINE_CONTROL_HEADERS, DropEngineControlHeaders
from serving.errors import install_error_handlers
from serving.json_body import JsonBodyLimit
from serving.lease import current_lease
from serving.openai_routes import router
from serving.resolver import ResolvedModel
from serving.settings import Settings
from serving.state import ServerState

ENGINE_HEADER_NAMES = {h.decode() for h in ENGINE_CONTROL_HEADERS}
TENANT = Tenant(id=2, name="acme", max_adapters=5, max_bytes=10**9, created_at=0.0)
ADAPTER = AdapterVersion(
    id=7, tenant_id=2, tenant_name="acme", name="support", version=1, digest="d", path="/x",
    size_bytes=1, rank=8, alpha=16.0, target_modules=("q_proj",), base_model="base",
    source="upload", created_at=0.0, deleted_at=None,
)  # fmt: skip


class FakeEngine:
    def __init__(self) -> None:
        self.loaded: set[int] = set()

    async def add_lora(self, lora) -> bool:
        self.loaded.add(lora.lora_int_id)
        return True

    async def remove_lora(self, lora_id: int) -> bool:
        self.loaded.discard(lora_id)
        return True

    async def list_loras(self) -> set[int]:
        return set(self.loaded)


class FakeServing:
    """Stands in for vLLM's serving class: a stream of `chunks` SSE lines, `delay` s apart."""

    def __init__(self, chunks: int = 50, delay: float = 0.01) -> None:
        self.chunks = chunks
        self.delay = delay
        self.generators_closed = 0

    async def _handle(self, request, raw):
        assert current_lease.get().resolved.adapter == ADAPTER
        self.engine_headers_seen = [h for h in raw.headers if h in ENGINE_HEADER_NAMES]
        if request.stream:
            return self._stream()
        await asyncio.sleep(self.delay * self.chunks)

        @dataclass
        class Done:
            def model_dump(self) -> dict:
                return {"object": "chat.completion", "choices": []}

        return Done()

    async def _stream(self):
        try:
            for i in range(self.chunks):
                await asyncio.sleep(self.delay)
                yield f"data: {json.dumps({'i': i})}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            self.generators_closed += 1

    create_chat_completion = _handle
    create_completion = _handle


class FakeResolver:
    async def resolve(self, tenant, model):
        if model == "support":
            return ResolvedModel("support", ADAPTER, "support@1")
        return None

    def invalidate(self) -> None:
        pass


class FakeRegistry:
    generation = 0

    def tenant_by_key(self, key: str):
        return TENANT if key == "good" else None


def make_app(serving: FakeServing) -> tuple[FastAPI, ServerState]:
    settings = Settings(admin_key="admin-key")
    lifecycle = AdapterLifecycle(FakeEngine())
    state = ServerState(
        settings=settings,
        base_name="base",
        adapters=None,  # type: ignore[arg-type]
        catalog=None,  # type: ignore[arg-type]
        auth=Authenticator(FakeRegistry(), TENANT, admin_key="admin-key", requires_auth=True),  # type: ignore[arg-type]
        resolver=FakeResolver(),  # type: ignore[arg-type]
        engine=None,
        lifecycle=lifecycle,
        serving_models=None,
        serving_chat=serving,
        serving_completion=serving,
        serving_tokenization=None,
        started_at=time.time(),
    )
    app = FastAPI()
    app.state.args = None
    install_error_handlers(app)
    app.add_middleware(JsonBodyLimit, max_bytes=1 << 20, max_depth=32)
    app.add_middleware(DropEngineControlHeaders)
    app.include_router(router)
    app.state.tenantlora = state
    return app, state


def scope(body: bytes) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "root_path": "",
        "query_string": b"",
        "headers": [
            (b"content-type", b"application/json"),
            (b"authorization", b"Bearer good"),
            (b"content-length", str(len(body)).encode()),
        ],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
        "state": {},
    }


def chat(stream: bool, model: str = "support") -> bytes:
    return json.dumps(
        {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    ).encode()


async def drive(
    app: FastAPI, body: bytes, disconnect_after_chunks: int | None, wait: float = 0.0
) -> list[dict]:
    """Run one request; deliver `http.disconnect` once `disconnect_after_chunks` body chunks
    were sent (0: before the first byte, after `wait` s; None: never, the client reads to the
    end)."""
    sent: list[dict] = []
    gone = asyncio.Event()
    body_given = False

    async def receive() -> dict:
        nonlocal body_given
        if not body_given:
            body_given = True
            return {"type": "http.request", "body": body, "more_body": False}
        if disconnect_after_chunks == 0:
            await asyncio.sleep(wait)
            return {"type": "http.disconnect"}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)
        chunks = sum(1 for m in sent if m["type"] == "http.response.body" and m.get("body"))
        if disconnect_after_chunks is not None and chunks >= disconnect_after_chunks:
            gone.set()

    await asyncio.wait_for(app(scope(body), receive, send), timeout=10)
    return sent


def held(state: ServerState) -> int:
    return state.lifecycle.in_flight(ADAPTER.id)


@pytest.mark.parametrize("disconnect_after", [0, 3, None])
def test_stream_lease_released_once(disconnect_after):
    serving = FakeServing()
    app, state = make_app(serving)

    async def run() -> list[dict]:
        return await drive(app, chat(stream=True), disconnect_after)

    sent = asyncio.run(run())
    assert held(state) == 0
    assert serving.generators_closed <= 1
    chunks = [m for m in sent if m["type"] == "http.response.body" and m.get("body")]
    if disconnect_after is None:
        assert b"[DONE]" in chunks[-1]["body"]
    else:
        assert len(chunks) < serving.chunks  # it did stop early


def test_non_stream_disconnect_cancels_and_releases():
    serving = FakeServing(chunks=100, delay=0.02)  # 2 s of "generation"
    app, state = make_app(serving)

    async def run() -> tuple[int, float]:
        started = time.perf_counter()
        task = asyncio.create_task(drive(app, chat(stream=False), 0, wait=0.3))
        await asyncio.sleep(0.1)
        during = held(state)
        await task
        return during, time.perf_counter() - started

    during, seconds = asyncio.run(run())
    assert during == 1
    assert held(state) == 0
    assert seconds < 1.5  # cancelled, not run to the end


def test_errors_release_and_concurrent_requests_balance():
    serving = FakeServing(chunks=5, delay=0.001)
    app, state = make_app(serving)

    async def run() -> list[list[dict]]:
        jobs = [drive(app, chat(stream=i % 2 == 0), None) for i in range(20)]
        jobs += [drive(app, chat(stream=True, model="nope"), None) for _ in range(5)]
        jobs += [drive(app, b'{"model": "support", "messages": [', None)]
        return await asyncio.gather(*jobs)

    results = asyncio.run(run())
    statuses = [r[0]["status"] for r in results]
    assert statuses.count(200) == 20 and statuses.count(404) == 5 and statuses[-1] == 400
    assert held(state) == 0


def test_clients_cannot_steer_the_engine_with_headers():
    """X-Vllm-Priority would bypass fair admission inside vLLM's scheduler; X-Request-Id could
    collide with another tenant's engine request: vLLM's serving classes never see them."""
    serving = FakeServing(chunks=1)
    app, _ = make_app(serving)
    body = chat(stream=False)
    request_scope = scope(body)
    request_scope["headers"] += [
        (b"x-vllm-priority", b"-1000000"),
        (b"X-Request-Id", b"someone-elses-id"),
        (b"x-data-parallel-rank", b"3"),
    ]
    sent: list[dict] = []
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict:
        if messages:
            return messages.pop()
        await asyncio.sleep(3600)  # the client stays; the handler's disconnect watcher waits
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(app(request_scope, receive, send))
    assert sent[0]["status"] == 200
    assert serving.engine_headers_seen == []

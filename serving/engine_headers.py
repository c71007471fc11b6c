"""Request headers that steer vLLM's engine are the server's, not the client's.

vLLM's serving classes read a few headers straight from the HTTP request: `X-Vllm-Priority`
would put a tenant ahead of everyone in the scheduler (bypassing fair admission, which sets
`request.priority`), `X-Request-Id` names the engine request (a chosen id could collide with
another tenant's), `X-data-parallel-rank` and `X-Session-ID` pick engine placement. This ASGI
middleware drops them before any route sees the request."""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

ENGINE_CONTROL_HEADERS = frozenset(
    {b"x-vllm-priority", b"x-request-id", b"x-data-parallel-rank", b"x-session-id"}
)


class DropEngineControlHeaders:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = scope.get("headers", ())
            if any(name.lower() in ENGINE_CONTROL_HEADERS for name, _ in headers):
                scope = dict(scope)
                scope["headers"] = [
                    (name, value)
                    for name, value in headers
                    if name.lower() not in ENGINE_CONTROL_HEADERS
                ]
        await self.app(scope, receive, send)

"""Bounded, strict JSON request bodies for every route.

`JsonBodyLimit` (ASGI middleware) reads an `application/json` body up to `max_bytes` (413 past
it, also for chunked bodies without a Content-Length), parses it once with a depth limit and
without the non-standard NaN / Infinity literals (400), and hands the parsed value to the route
in the request scope (`parsed_json`). Non-JSON bodies (multipart uploads) pass through untouched:
their routes bound them themselves."""

from __future__ import annotations

import json
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.errors import APIError, error_response

SCOPE_KEY = "tenantlora.json"


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _depth(value: Any, limit: int) -> int:
    """Nesting depth of a parsed value, stopping as soon as it passes `limit`."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            if deepest > limit:
                return deepest
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return deepest


def parse_json(raw: bytes, max_depth: int) -> Any:
    """Parse a request body, or raise a 400 APIError saying what is wrong."""
    try:
        value = json.loads(raw, parse_constant=_refuse_constant)
    except RecursionError as exc:
        raise APIError(400, f"JSON nested deeper than {max_depth} levels.", "invalid_json") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(400, f"Request body is not valid JSON: {exc}", "invalid_json") from exc
    if _depth(value, max_depth) > max_depth:
        raise APIError(400, f"JSON nested deeper than {max_depth} levels.", "invalid_json")
    return value


def is_json(scope: Scope) -> bool:
    for name, value in scope.get("headers", ()):
        if name == b"content-type":
            return value.split(b";", 1)[0].strip().lower() == b"application/json"
    return False


class JsonBodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int, max_depth: int) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.max_depth = max_depth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD") or not is_json(scope):
            await self.app(scope, receive, send)
            return
        try:
            body = await self._read(scope, receive)
            scope[SCOPE_KEY] = parse_json(body, self.max_depth)
        except APIError as exc:
            await error_response(exc.status, exc.message, exc.code)(scope, receive, send)
            return
        except _Disconnected:
            return
        await self.app(scope, _replay(body, receive), send)

    async def _read(self, scope: Scope, receive: Receive) -> bytes:
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                raise self._too_large()
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Disconnected
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                raise self._too_large()
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _too_large(self) -> APIError:
        return APIError(413, f"Request body exceeds {self.max_bytes} bytes.", "request_too_large")


class _Disconnected(Exception):
    pass


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: wait for the disconnect, as the server would

    return replay

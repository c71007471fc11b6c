"""One request's hold on shared resources, from admission to its last byte.

A `RequestLease` holds the adapter's in-flight count (so a deleted adapter leaves the engine only
after its last request), the admission ticket (a concurrency slot and the tokens it was charged),
and what the metrics and the usage ledger need. `release(status)` runs exactly once whatever
happens: success, error, end of a stream, or a client that goes away before the first byte or
mid-stream (`LeasedStreamingResponse` releases when the response ends, however it ends).

The lease of the running request is reachable through `current_lease` (a context variable), the
one channel by which vLLM's serving classes (`serving.vllm_compat.serving`) learn the adapter the
tenant layer resolved, and by which the engine wrapper (`serving.metrics.ObservedEngine`) reports
token counts."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from serving import metrics

if TYPE_CHECKING:
    from adapters.registry import Tenant
    from serving.resolver import ResolvedModel

log = logging.getLogger(__name__)

CLIENT_CLOSED = 499  # nginx's status for "the client went away"


class RequestLease:
    def __init__(
        self,
        tenant: Tenant,
        route: str,
        *,
        on_release: list[Callable[[RequestLease, int], None]] | None = None,
    ) -> None:
        self.tenant = tenant
        self.route = route
        self.started = time.perf_counter()
        self.resolved: ResolvedModel | None = None
        self.ticket: Any = None  # the admission ticket, when admission is on
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.status: int | None = None
        self._on_release = list(on_release or [])
        self._released = False

    @property
    def released(self) -> bool:
        return self._released

    @property
    def labels(self) -> metrics.RequestLabels:
        adapter = self.resolved.metrics_label if self.resolved else "none"
        return metrics.RequestLabels(self.tenant.name, adapter)

    @property
    def headers(self) -> dict[str, str]:
        return dict(getattr(self.ticket, "headers", None) or {})

    def on_release(self, callback: Callable[[RequestLease, int], None]) -> None:
        self._on_release.append(callback)

    def add_tokens(self, prompt: int, completion: int) -> None:
        self.prompt_tokens += prompt
        self.completion_tokens += completion

    def release(self, status: int) -> None:
        """Give everything back (once; later calls do nothing) and record the outcome."""
        if self._released:
            return
        self._released = True
        self.status = status
        for callback in reversed(self._on_release):
            try:
                callback(self, status)
            except Exception:  # noqa: BLE001 - one failing hook must not keep the others
                log.exception("releasing a request lease")
        metrics.observe_request(self.labels, self.route, status, time.perf_counter() - self.started)


current_lease: ContextVar[RequestLease | None] = ContextVar("tenantlora_lease", default=None)


class LeasedStreamingResponse(StreamingResponse):
    """An SSE response that releases its lease when it ends: last chunk sent, error, or the
    client gone (also before the first byte, when the body generator never started)."""

    def __init__(self, content: AsyncIterator[str], lease: RequestLease, **kwargs: Any) -> None:
        super().__init__(content, media_type="text/event-stream", **kwargs)
        self.lease = lease
        self._source = content
        self._finished = False

    async def stream_response(self, send: Send) -> None:
        await super().stream_response(send)
        self._finished = True  # the last chunk went out; otherwise the client left first

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            status = self.status_code if self._finished else CLIENT_CLOSED
            try:
                await self._source.aclose()  # stops the engine request if the body never ran out
            except Exception:  # noqa: BLE001 - closing an already failed stream
                pass
            finally:
                self.lease.release(status)

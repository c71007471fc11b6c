"""Reading an adapter upload without trusting it.

Before the body is read: the tenant's concurrent-upload slot (429 past `max_concurrent_uploads`)
and its quota (403 when already full). While it is read: the request stream is counted and
stops at the size limit (413), Content-Length or not, so a chunked body is never spooled past
it; the multipart parser keeps at most 1 MiB of the file in memory and the rest in an anonymous
temporary file, which nothing can leave behind."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

from fastapi import Request
from starlette.datastructures import FormData
from starlette.formparsers import MultiPartException, MultiPartParser

from adapters.errors import AdapterTooLarge
from serving.errors import APIError
from serving.json_body import SCOPE_KEY, is_json

FORM_OVERHEAD_BYTES = 1 << 20  # multipart headers and the small fields beside the file
UPLOAD_RETRY_AFTER_SECONDS = 5


class UploadSlots:
    """Uploads in progress per tenant in this process."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._active: dict[int, int] = {}

    @contextmanager
    def hold(self, tenant_id: int) -> Iterator[None]:
        active = self._active.get(tenant_id, 0)
        if active >= self.limit:
            raise APIError(
                429,
                f"Too many adapter uploads in progress for this tenant (at most {self.limit} at "
                "once); retry when one has finished.",
                "too_many_uploads",
                headers={"Retry-After": str(UPLOAD_RETRY_AFTER_SECONDS)},
            )
        self._active[tenant_id] = active + 1
        try:
            yield
        finally:
            left = self._active[tenant_id] - 1
            if left:
                self._active[tenant_id] = left
            else:
                del self._active[tenant_id]


def upload_slots(request: Request, limit: int) -> UploadSlots:
    """The app's one `UploadSlots` (made on first use; the event loop is single-threaded)."""
    slots = getattr(request.app.state, "tenantlora_upload_slots", None)
    if slots is None:
        slots = UploadSlots(limit)
        request.app.state.tenantlora_upload_slots = slots
    return slots


async def _bounded_body(request: Request, limit: int) -> AsyncIterator[bytes]:
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            raise AdapterTooLarge(f"upload exceeds the limit of {limit} bytes")
        yield chunk


async def read_upload_form(request: Request, max_adapter_bytes: int) -> FormData:
    """Parse the multipart body, refusing it once more than the limit has arrived. A JSON object
    of string fields (`name`, `uri`, `tenant`...; no `file`) is read as the same form."""
    content_type = request.headers.get("content-type", "")
    if is_json(request.scope):
        body = request.scope.get(SCOPE_KEY)  # parsed and bounded by the JsonBodyLimit middleware
        if not isinstance(body, dict) or not all(isinstance(v, str) for v in body.values()):
            raise APIError(400, "The JSON body must be an object of string fields.", "invalid_form")
        return FormData(body.items())
    if not content_type.startswith("multipart/form-data"):
        raise APIError(
            415,
            "Send the adapter as multipart/form-data (fields `name`, `file`), or a JSON object "
            "with `name` and `uri`.",
            "unsupported_media_type",
        )
    limit = max_adapter_bytes + FORM_OVERHEAD_BYTES
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        raise AdapterTooLarge(
            f"upload of {length} bytes exceeds the limit of {max_adapter_bytes} bytes"
        )
    parser = MultiPartParser(
        request.headers, _bounded_body(request, limit), max_files=1, max_fields=8
    )
    try:
        return await parser.parse()
    except MultiPartException as exc:
        raise APIError(400, f"Malformed multipart body: {exc.message}", "invalid_form") from exc

"""OpenAI-compatible routes: /v1/models, /v1/chat/completions, /v1/completions.

Each route is a thin handler with a typed body; `serve` runs every generation request the same
way: resolve the model for the tenant -> admit -> take the lease -> hand over to vLLM's serving
class -> answer (JSON or SSE), with the lease released exactly once on every path."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from http import HTTPStatus
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.openai.completion.protocol import CompletionRequest
from vllm.entrypoints.serve.engine.protocol import ErrorResponse
from vllm.entrypoints.serve.exception_handling.error_response import create_error_response
from vllm.entrypoints.serve.utils.api_utils import with_cancellation

from serving.auth import Caller, current_caller
from serving.errors import APIError, error_response, model_not_found
from serving.json_body import SCOPE_KEY, is_json
from serving.lease import CLIENT_CLOSED, LeasedStreamingResponse, RequestLease, current_lease
from serving.state import ServerState, server_state
from serving.vllm_compat.messages import rewrite_message

log = logging.getLogger(__name__)
router = APIRouter()
Body = TypeVar("Body", bound=BaseModel)


@router.get("/v1/models")
async def list_models(
    caller: Caller = Depends(current_caller), state: ServerState = Depends(server_state)
) -> dict:
    created = int(state.started_at)
    data = [
        {
            "id": state.base_name,
            "object": "model",
            "created": created,
            "owned_by": "tenantlora",
            "root": state.base_name,
            "parent": None,
            "max_model_len": state.settings.max_model_len,
        }
    ]
    for adapter in await state.run_sync(state.catalog.visible, caller.tenant):
        data.append(
            {
                "id": adapter.name,
                "object": "model",
                "created": int(adapter.created_at),
                "owned_by": adapter.tenant_name,  # the caller itself, or `public` (static)
                "root": adapter.pinned_name,
                "parent": state.base_name,
                "version": adapter.version,
            }
        )
    return {"object": "list", "data": data}


def typed_body(model: type[Body]) -> Callable[[Request], Body]:
    """A dependency: the request's JSON body (parsed by `serving.json_body`) as `model`."""

    async def parse(raw: Request) -> Body:
        if not is_json(raw.scope):
            raise APIError(
                415, "Send the request body as application/json.", "unsupported_media_type"
            )
        body = raw.scope.get(SCOPE_KEY)
        if not isinstance(body, dict):
            raise APIError(400, "Request body must be a JSON object.", "invalid_json")
        try:
            return model.model_validate(body)
        except ValidationError as exc:
            first = exc.errors()[0]
            loc = ".".join(
                str(p) for p in first.get("loc", ()) if not str(p).startswith(("function", "union"))
            )
            message = f"Invalid request: {loc or 'body'}: {first.get('msg')}"
            raise APIError(400, message, "invalid_request", loc or None) from exc

    return parse


chat_body = typed_body(ChatCompletionRequest)
completion_body = typed_body(CompletionRequest)


@router.post("/v1/chat/completions")
@with_cancellation
async def chat_completions(
    raw_request: Request,
    body: ChatCompletionRequest = Depends(chat_body),
    caller: Caller = Depends(current_caller),
    state: ServerState = Depends(server_state),
) -> Response:
    return await serve(state, caller, body, raw_request, "chat")


@router.post("/v1/completions")
@with_cancellation
async def completions(
    raw_request: Request,
    body: CompletionRequest = Depends(completion_body),
    caller: Caller = Depends(current_caller),
    state: ServerState = Depends(server_state),
) -> Response:
    return await serve(state, caller, body, raw_request, "completions")


async def serve(
    state: ServerState,
    caller: Caller,
    request: ChatCompletionRequest | CompletionRequest,
    raw_request: Request,
    route: str,
) -> Response:
    lease = state.new_lease(caller.tenant, route)

    async def work() -> Any:
        resolved = await resolve_for(state, lease, request.model)
        await state.admit(lease, request)
        request.cache_salt = state.cache_salts.salt_for(
            caller.tenant.id, request.cache_salt, on_base=resolved.adapter is None
        )
        if resolved.adapter is not None:
            state.lifecycle.acquire(resolved.adapter.id)
            lease.on_release(lambda _lease, _status: state.lifecycle.release(resolved.adapter.id))
            await _ensure_loaded(state, resolved, request.model or "")
        if route == "chat":
            return await state.serving_chat.create_chat_completion(request, raw_request)
        return await state.serving_completion.create_completion(request, raw_request)

    result = await run_in_lease(lease, work)
    if isinstance(result, Response):
        return result
    if isinstance(result, AsyncIterator):
        return LeasedStreamingResponse(result, lease, headers=lease.headers)
    lease.release(200)
    return JSONResponse(result.model_dump(), headers=lease.headers)


async def resolve_for(state: ServerState, lease: RequestLease, model: str | None):
    """The model the lease's tenant means, set on the lease and made the running request's
    (`current_lease`, read by vLLM's serving classes); the same 404 for unknown and foreign."""
    resolved = await state.resolver.resolve(lease.tenant, model)
    if resolved is None:
        raise model_not_found(model or "")
    lease.resolved = resolved
    current_lease.set(lease)
    return resolved


async def run_in_lease(lease: RequestLease, work: Callable[[], Awaitable[Any]]) -> Any:
    """Run a request's `work` (resolution, admission, vLLM's serving call) under its lease and
    return vLLM's result. On any failure the lease ends with that status: an APIError goes on
    with the lease's rate-limit headers, vLLM's errors (raised or returned) come back as our
    error response, and a cancellation (the client left) ends it as 499."""
    try:
        result = await work()
    except APIError as exc:
        lease.release(exc.status)
        exc.headers = {**lease.headers, **exc.headers}
        raise
    except Exception as exc:  # noqa: BLE001 - vLLM's own mapping of engine errors to statuses
        return _engine_error(lease, create_error_response(exc))
    except BaseException:
        lease.release(CLIENT_CLOSED)  # cancelled: the client went away
        raise
    if isinstance(result, ErrorResponse):
        return _engine_error(lease, result)
    return result


async def _ensure_loaded(state: ServerState, resolved, model: str) -> None:
    try:
        await state.lifecycle.ensure_loaded(resolved.lora_request())
    except Exception as exc:  # noqa: BLE001 - the engine refused the stored adapter
        reference = uuid.uuid4().hex[:12]
        log.exception(
            "adapter %s failed to load (reference %s)", resolved.adapter.engine_name, reference
        )
        raise APIError(
            422,
            f"Adapter `{model}` could not be loaded by the engine (reference {reference}).",
            "adapter_load_failed",
        ) from exc


def _engine_error(lease: RequestLease, error: ErrorResponse) -> JSONResponse:
    """vLLM's error (HTTP status as `code`) in the shape our other errors have. A 5xx says only
    that it failed and a reference; its details go to the server log."""
    info = error.error
    lease.release(info.code)
    message = rewrite_message(info.message)  # no vLLM flag names
    if info.param == "input_tokens":
        code = "context_length_exceeded"
    elif info.code < 500 and info.param:
        code = f"invalid_{info.param}"
    else:
        code = HTTPStatus(info.code).phrase.lower().replace(" ", "_")
    if info.code >= 500:
        reference = uuid.uuid4().hex[:12]
        log.error("request failed (reference %s): %s", reference, info.message)
        message = f"The server could not complete the request (reference {reference})."
    return error_response(info.code, message, code, info.param, lease.headers)

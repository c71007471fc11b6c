"""OpenAI-compatible routes: /v1/models, /v1/chat/completions, /v1/completions."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from http import HTTPStatus

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.openai.completion.protocol import CompletionRequest
from vllm.entrypoints.serve.engine.protocol import ErrorResponse
from vllm.entrypoints.serve.exception_handling.error_response import create_error_response

from adapters.registry import Tenant
from serving import metrics
from serving.auth import current_tenant
from serving.errors import APIError, error_response, model_not_found
from serving.state import ServerState, server_state
from serving.vllm_serving import ResolvedModel, current_model

log = logging.getLogger(__name__)
router = APIRouter()


@router.get("/v1/models")
async def list_models(
    tenant: Tenant = Depends(current_tenant), state: ServerState = Depends(server_state)
) -> dict:
    created = int(state.started_at)
    data = [
        {
            "id": state.base_name,
            "object": "model",
            "created": created,
            "owned_by": "tenantlora",
            "root": state.base_path,
            "parent": None,
            "max_model_len": state.settings.max_model_len,
        }
    ]
    for adapter in state.catalog.visible(tenant):
        data.append(
            {
                "id": adapter.name,
                "object": "model",
                "created": int(adapter.created_at),
                "owned_by": adapter.tenant_name,
                "root": adapter.pinned_name,
                "parent": state.base_name,
                "version": adapter.version,
            }
        )
    return {"object": "list", "data": data}


async def _json_body(raw: Request) -> dict:
    media = raw.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media != "application/json":
        raise APIError(415, "Send the request body as application/json.", "unsupported_media_type")
    try:
        body = json.loads(await raw.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"Request body is not valid JSON: {exc}", "invalid_json") from exc
    if not isinstance(body, dict):
        raise APIError(400, "Request body must be a JSON object.", "invalid_json")
    return body


def _validation_message(exc: ValidationError) -> tuple[str, str | None]:
    first = exc.errors()[0]
    loc = ".".join(
        str(p) for p in first.get("loc", ()) if not str(p).startswith(("function", "union"))
    )
    return f"Invalid request: {loc or 'body'}: {first.get('msg')}", loc or None


def _resolve(state: ServerState, tenant: Tenant, model: str | None) -> tuple[ResolvedModel, str]:
    """The adapter `model` names for this tenant, and the metrics label for it."""
    from vllm.lora.request import LoRARequest

    if not model or model == state.base_name:
        return ResolvedModel(state.base_name, None), "base"
    adapter = state.catalog.resolve(tenant, model)
    if adapter is None:
        raise model_not_found(model)
    lora = LoRARequest(adapter.engine_name, adapter.id, adapter.path)
    label = adapter.pinned_name if adapter.tenant_name == tenant.name else adapter.engine_name
    return ResolvedModel(model, lora), label


async def _serve(raw: Request, tenant: Tenant, state: ServerState, route: str):
    started = time.perf_counter()
    labels = metrics.RequestLabels(tenant.name, "none")

    def finish(status: int) -> None:
        metrics.REQUESTS.labels(labels.tenant, labels.adapter, route, str(status)).inc()
        if status < 400:
            metrics.LATENCY.labels(labels.tenant, labels.adapter).observe(
                time.perf_counter() - started
            )

    try:
        body = await _json_body(raw)
        request_cls = ChatCompletionRequest if route == "chat" else CompletionRequest
        try:
            request = request_cls.model_validate(body)
        except ValidationError as exc:
            message, param = _validation_message(exc)
            raise APIError(400, message, "invalid_request", param) from exc
        resolved, adapter_label = _resolve(state, tenant, request.model)
    except APIError as exc:
        finish(exc.status)
        raise
    labels = metrics.RequestLabels(tenant.name, adapter_label)
    metrics.current_labels.set(labels)
    current_model.set(resolved)
    lora_id = resolved.lora.lora_int_id if resolved.lora else None

    if lora_id is not None:
        state.lifecycle.acquire(lora_id)
    try:
        if resolved.lora is not None:
            try:
                await state.lifecycle.ensure_loaded(resolved.lora)
            except Exception as exc:  # noqa: BLE001 - the engine refused the stored adapter
                log.exception("adapter %s failed to load", resolved.lora.lora_name)
                raise APIError(
                    422,
                    f"Adapter `{request.model}` could not be loaded: {exc}",
                    "adapter_load_failed",
                ) from exc
        handler = state.serving_chat if route == "chat" else state.serving_completion
        if route == "chat":
            result = await handler.create_chat_completion(request, raw)
        else:
            result = await handler.create_completion(request, raw)
    except APIError as exc:
        _release(state, lora_id)
        finish(exc.status)
        raise
    except Exception as exc:  # noqa: BLE001 - vLLM's own mapping of engine errors to statuses
        _release(state, lora_id)
        error = create_error_response(exc)
        finish(error.error.code)
        if error.error.code >= 500:
            log.exception("request failed")
        return _openai_error(error)
    except BaseException:
        _release(state, lora_id)
        finish(499)  # cancelled: the client went away
        raise

    if isinstance(result, ErrorResponse):
        _release(state, lora_id)
        finish(result.error.code)
        return _openai_error(result)
    if not isinstance(result, AsyncIterator):
        _release(state, lora_id)
        finish(200)
        return JSONResponse(result.model_dump())

    async def stream() -> AsyncIterator[str]:
        status = 200
        try:
            async for chunk in result:
                yield chunk
        except BaseException:
            status = 499
            raise
        finally:
            _release(state, lora_id)
            finish(status)

    return StreamingResponse(stream(), media_type="text/event-stream")


def _openai_error(error: ErrorResponse) -> JSONResponse:
    """vLLM's error (HTTP status as `code`) in the shape our other errors have."""
    info = error.error
    if info.param == "input_tokens":
        code = "context_length_exceeded"
    elif info.code < 500 and info.param:
        code = f"invalid_{info.param}"
    else:
        code = HTTPStatus(info.code).phrase.lower().replace(" ", "_")
    return error_response(info.code, info.message, code, info.param)


def _release(state: ServerState, lora_id: int | None) -> None:
    if lora_id is not None:
        state.lifecycle.release(lora_id)


@router.post("/v1/chat/completions")
async def chat_completions(
    raw: Request,
    tenant: Tenant = Depends(current_tenant),
    state: ServerState = Depends(server_state),
):
    return await _serve(raw, tenant, state, "chat")


@router.post("/v1/completions")
async def completions(
    raw: Request,
    tenant: Tenant = Depends(current_tenant),
    state: ServerState = Depends(server_state),
):
    return await _serve(raw, tenant, state, "completions")

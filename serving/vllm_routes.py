"""vLLM's own extra routes, so tools written for `vllm serve` keep working: the runtime adapter
API (`/v1/load_lora_adapter`, `/v1/unload_lora_adapter`) and `/tokenize`, `/detokenize`.

Request and response shapes are vLLM's. What they do is tenantlora's:
- load = registration of a server folder for the calling tenant: admin key only, and only a
  folder under `adapter_roots` (the checks of `POST /v1/adapters` with `path=`, reused). The
  admin loads for everyone (the `public` tenant, like `--lora`) or, with `?tenant=NAME`, for one
  tenant. A tenant key gets a 403 that points to the archive upload: no tenant names server paths.
- unload = `DELETE /v1/adapters/{name}` for the calling tenant (same route code, same retiring).
- tokenize / detokenize: per model, resolved for the tenant like the OpenAI routes (unknown and
  foreign names: the same 404); adapters share the base tokenizer. Anonymous callers may use
  them where the OpenAI routes are open to them."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.datastructures import FormData
from vllm.entrypoints.serve.lora.protocol import LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest
from vllm.entrypoints.serve.tokenize.protocol import (
    DetokenizeRequest,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
)
from vllm.entrypoints.serve.utils.api_utils import with_cancellation

from adapters.registry import Tenant
from serving.admin_routes import _owner, _register_from_form, delete_adapter
from serving.auth import Caller, current_caller, current_tenant, is_admin_request, require_writer
from serving.errors import APIError
from serving.json_body import SCOPE_KEY
from serving.lease import RequestLease
from serving.openai_routes import resolve_for, run_in_lease, typed_body
from serving.state import ServerState, server_state

router = APIRouter()

load_body = typed_body(LoadLoRAAdapterRequest)
unload_body = typed_body(UnloadLoRAAdapterRequest)
detokenize_body = typed_body(DetokenizeRequest)
_tokenize_chat_body = typed_body(TokenizeChatRequest)
_tokenize_completion_body = typed_body(TokenizeCompletionRequest)


async def tokenize_body(raw: Request) -> TokenizeChatRequest | TokenizeCompletionRequest:
    """vLLM's two tokenize shapes: `messages` (chat template applied) or `prompt`."""
    body = raw.scope.get(SCOPE_KEY)
    chat = isinstance(body, dict) and "messages" in body
    return await (_tokenize_chat_body if chat else _tokenize_completion_body)(raw)


@router.post("/v1/load_lora_adapter", dependencies=[Depends(require_writer)])
async def load_lora_adapter(
    request: Request,
    body: LoadLoRAAdapterRequest = Depends(load_body),
    tenant: Tenant = Depends(current_tenant),
    state: ServerState = Depends(server_state),
) -> Response:
    """Register the server folder `lora_path` as adapter `lora_name` (admin only). vLLM refuses
    a name already loaded unless `load_inplace`; here `load_inplace` makes a new version."""
    if not is_admin_request(request, state):
        raise APIError(
            403,
            "Loading an adapter from a server path needs the admin key. Upload the adapter "
            "instead: POST /v1/adapters (multipart fields `name` and `file`, a .tar.gz or .zip).",
            "admin_required",
            "lora_path",
        )
    if body.is_3d_lora_weight:
        raise APIError(
            400,
            "`is_3d_lora_weight` adapters are not supported.",
            "unsupported",
            "is_3d_lora_weight",
        )
    owner = await _owner(request, state, tenant, request.query_params.get("tenant"))
    name = body.lora_name
    exists = await run_in_threadpool(state.adapters.registry.find_live, owner, name, None)
    if exists is not None and not body.load_inplace:
        raise APIError(
            400,
            f"The adapter `{name}` is already loaded. Send `load_inplace: true` to register the "
            "folder as its new version.",
            "adapter_exists",
            "lora_name",
        )
    form = FormData({"name": name, "path": body.lora_path})
    try:
        await _register_from_form(request, state, owner, form, admin=True)
    except APIError as exc:
        if exc.param == "path":
            exc.param = "lora_path"
        raise
    return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")


@router.post("/v1/unload_lora_adapter", dependencies=[Depends(require_writer)])
async def unload_lora_adapter(
    request: Request,
    body: UnloadLoRAAdapterRequest = Depends(unload_body),
    tenant: Tenant = Depends(current_tenant),
    state: ServerState = Depends(server_state),
) -> Response:
    """Delete every version of `lora_name` for the calling tenant, as DELETE /v1/adapters does."""
    await delete_adapter(body.lora_name, request, tenant, state)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")


@router.post("/tokenize")
@with_cancellation
async def tokenize(
    raw_request: Request,
    body: TokenizeChatRequest | TokenizeCompletionRequest = Depends(tokenize_body),
    caller: Caller = Depends(current_caller),
    state: ServerState = Depends(server_state),
) -> Response:
    return await _tokenization_call(state, caller, body, raw_request, "tokenize")


@router.post("/detokenize")
@with_cancellation
async def detokenize(
    raw_request: Request,
    body: DetokenizeRequest = Depends(detokenize_body),
    caller: Caller = Depends(current_caller),
    state: ServerState = Depends(server_state),
) -> Response:
    return await _tokenization_call(state, caller, body, raw_request, "detokenize")


async def _tokenization_call(
    state: ServerState, caller: Caller, body: Any, raw_request: Request, route: str
) -> Response:
    """Resolve the model for the tenant (the same 404 as the OpenAI routes), then run vLLM's
    `create_<route>` with the resolved adapter in the lease; errors in our shape."""
    call = getattr(state.serving_tokenization, f"create_{route}")
    lease = RequestLease(caller.tenant, route)  # metrics only: no usage, no admission

    async def work() -> Any:
        await resolve_for(state, lease, body.model)
        return await call(body, raw_request)

    result = await run_in_lease(lease, work)
    if isinstance(result, Response):
        return result
    lease.release(200)
    return JSONResponse(result.model_dump())

"""Tenant lifecycle, API keys and usage routes.

Admin: `/v1/tenants` (create, list), `/v1/tenants/{name}` (show, PATCH quotas and limits,
DELETE), `/v1/tenants/{name}/keys[/{id}]` (create, list, revoke). A tenant: `/v1/keys[/{id}]`
for its own keys, `/v1/usage` for its own usage (the admin: everyone's). Keys are shown in clear
only in the response that creates them; lists show a short prefix."""

from __future__ import annotations

import json
import logging
import re
import time
from datetime import date, timedelta
from typing import Annotated, TypeVar

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError

from adapters.errors import NotFound
from adapters.keys import ApiKey
from adapters.names import NAME_PATTERN
from adapters.registry import PUBLIC_TENANT, TENANT_LIMITS, Tenant, UsageRow
from adapters.usage import utc_today
from serving import metrics
from serving.admin_routes import retire_in_background
from serving.auth import current_tenant, is_admin_request, require_admin
from serving.errors import APIError
from serving.state import ServerState, server_state

log = logging.getLogger(__name__)
router = APIRouter()

_MAX_INT = 2**53  # exact in every JSON parser; far below the database's BIGINT
_LATEST_EXPIRY = 253402300799  # 9999-12-31T23:59:59Z
MAX_USAGE_DAYS = 366
DEFAULT_USAGE_DAYS = 30

Count = Annotated[StrictInt, Field(ge=1, le=_MAX_INT)]
Weight = Annotated[float, Field(gt=0, le=1e6, allow_inf_nan=False, strict=True)]


class TenantFields(BaseModel):
    """Quotas and limits an admin sets; for limits, null means the server's default."""

    model_config = ConfigDict(extra="forbid")

    max_adapters: Count | None = None
    max_bytes: Count | None = None
    max_concurrent: Count | None = None
    requests_per_minute: Count | None = None
    tokens_per_minute: Count | None = None
    max_n: Count | None = None
    max_prompts: Count | None = None
    weight: Weight | None = None


class TenantCreate(TenantFields):
    name: Annotated[str, Field(pattern=NAME_PATTERN, strict=True)]


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, Field(min_length=1, max_length=64, strict=True)] | None = None
    expires_in_seconds: Count | None = None
    expires_at: Annotated[float, Field(gt=0, allow_inf_nan=False, strict=True)] | None = None


M = TypeVar("M", bound=BaseModel)


async def _body(request: Request, model: type[M]) -> M:
    """The JSON body validated against `model`; any fault is a 400 naming the field."""
    raw = await request.body()
    try:
        data = _json_object(raw)
        return model.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        field = ".".join(str(p) for p in error["loc"]) or None
        if error["type"] == "extra_forbidden":
            raise APIError(400, f"Unknown field `{field}`.", "unknown_field", field) from None
        raise APIError(
            400, f"Invalid value for `{field}`: {error['msg']}.", "invalid_value", field
        ) from None


def _json_object(raw: bytes) -> dict:
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        raise APIError(400, "The body is not valid JSON.", "invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "The body must be a JSON object.", "invalid_json")
    return data


def tenant_dict(tenant: Tenant) -> dict:
    return {
        "id": tenant.id,
        "object": "tenant",
        "name": tenant.name,
        "max_adapters": tenant.max_adapters,
        "max_bytes": tenant.max_bytes,
        **{limit: getattr(tenant, limit) for limit in TENANT_LIMITS},
        "created": int(tenant.created_at),
    }


async def _tenant_named(state: ServerState, name: str) -> Tenant:
    tenant = await run_in_threadpool(state.adapters.registry.tenant_by_name, name)
    if tenant is None:
        raise APIError(404, f"Tenant `{name}` does not exist.", "tenant_not_found")
    return tenant


# ---- tenants (admin) ---------------------------------------------------------------------------


@router.post("/v1/tenants", dependencies=[Depends(require_admin)], status_code=201)
async def create_tenant(request: Request, state: ServerState = Depends(server_state)) -> dict:
    body = await _body(request, TenantCreate)
    if body.name == PUBLIC_TENANT:
        raise APIError(409, "`public` is reserved for the server's static adapters.", "conflict")
    limits = {k: getattr(body, k) for k in TENANT_LIMITS if getattr(body, k) is not None}
    tenant, key = await run_in_threadpool(
        lambda: state.adapters.registry.create_tenant(
            body.name,
            max_adapters=body.max_adapters or state.settings.tenant_max_adapters,
            max_bytes=body.max_bytes or state.settings.tenant_max_bytes,
            **limits,
        )
    )
    log.info("created tenant %s", tenant.name)  # never the key
    return {**tenant_dict(tenant), "api_key": key}


@router.get("/v1/tenants", dependencies=[Depends(require_admin)])
async def list_tenants(state: ServerState = Depends(server_state)) -> dict:
    tenants = await run_in_threadpool(state.adapters.registry.list_tenants)
    return {"object": "list", "data": [tenant_dict(t) for t in tenants]}


@router.get("/v1/tenants/{name}", dependencies=[Depends(require_admin)])
async def get_tenant(name: str, state: ServerState = Depends(server_state)) -> dict:
    return tenant_dict(await _tenant_named(state, name))


@router.patch("/v1/tenants/{name}", dependencies=[Depends(require_admin)])
async def update_tenant(
    name: str, request: Request, state: ServerState = Depends(server_state)
) -> dict:
    """Change quotas and limits; fields left out keep their value, a limit set to null goes
    back to the server's default."""
    body = await _body(request, TenantFields)
    changes = {field: getattr(body, field) for field in body.model_fields_set}
    for quota in ("max_adapters", "max_bytes"):
        if quota in changes and changes[quota] is None:
            raise APIError(400, f"`{quota}` cannot be null.", "invalid_value", quota)
    tenant = await _tenant_named(state, name)
    updated = await run_in_threadpool(
        lambda: state.adapters.registry.update_tenant(tenant, **changes)
    )
    state.invalidate_caches()
    log.info("updated tenant %s: %s", name, sorted(changes))
    return tenant_dict(updated)


@router.delete("/v1/tenants/{name}", dependencies=[Depends(require_admin)])
async def delete_tenant(name: str, state: ServerState = Depends(server_state)) -> dict:
    """Keys stop working at once; adapters leave the engine after their in-flight requests and
    their files go unless another live adapter has the same content. The name is not reused."""
    if name == PUBLIC_TENANT:
        raise APIError(400, "The `public` tenant cannot be deleted.", "public_tenant", "name")
    tenant = await _tenant_named(state, name)
    versions = await run_in_threadpool(state.adapters.registry.delete_tenant, tenant)
    state.invalidate_caches()
    retire_in_background(state, versions)
    metrics.forget_tenant(name)
    if state.admission is not None:
        state.admission.forget_tenant(name)
    log.info("deleted tenant %s (%d adapter versions)", name, len(versions))
    return {
        "object": "tenant.deleted",
        "deleted": True,
        "id": name,
        "adapters": [v.pinned_name for v in versions],
    }


# ---- keys --------------------------------------------------------------------------------------


async def _create_key(request: Request, state: ServerState, tenant: Tenant) -> dict:
    body = await _body(request, KeyCreate)
    now = time.time()
    if body.expires_in_seconds is not None and body.expires_at is not None:
        raise APIError(400, "Give `expires_in_seconds` or `expires_at`, not both.", "invalid_value")
    expires_at = body.expires_at
    if body.expires_in_seconds is not None:
        expires_at = now + body.expires_in_seconds
    if expires_at is not None and not (now < expires_at <= _LATEST_EXPIRY):
        raise APIError(400, "`expires_at` must be in the future.", "invalid_value", "expires_at")
    key, secret = await run_in_threadpool(
        lambda: state.adapters.registry.create_key(
            tenant,
            name=body.name,
            expires_at=expires_at,
            max_active=state.settings.tenant_max_keys,
        )
    )
    log.info("created key %s for tenant %s", key.prefix, tenant.name)  # the prefix only
    return {**key.public_dict(time.time()), "api_key": secret}


async def _list_keys(state: ServerState, tenant: Tenant) -> dict:
    keys: list[ApiKey] = await run_in_threadpool(state.adapters.registry.list_keys, tenant)
    now = time.time()
    return {"object": "list", "data": [k.public_dict(now) for k in keys]}


async def _revoke_key(state: ServerState, tenant: Tenant, key_id: str) -> dict:
    if not (key_id.isascii() and key_id.isdigit() and len(key_id) <= 15):
        raise APIError(404, f"Key `{key_id}` does not exist.", "key_not_found")
    try:
        key = await run_in_threadpool(state.adapters.registry.revoke_key, tenant, int(key_id))
    except NotFound:  # another tenant's key looks the same as a missing one
        raise APIError(404, f"Key `{key_id}` does not exist.", "key_not_found") from None
    state.invalidate_caches()
    log.info("revoked key %s of tenant %s", key.prefix, tenant.name)
    return key.public_dict(time.time())


@router.post("/v1/tenants/{name}/keys", dependencies=[Depends(require_admin)], status_code=201)
async def create_tenant_key(
    name: str, request: Request, state: ServerState = Depends(server_state)
) -> dict:
    return await _create_key(request, state, await _tenant_named(state, name))


@router.get("/v1/tenants/{name}/keys", dependencies=[Depends(require_admin)])
async def list_tenant_keys(name: str, state: ServerState = Depends(server_state)) -> dict:
    return await _list_keys(state, await _tenant_named(state, name))


@router.delete("/v1/tenants/{name}/keys/{key_id}", dependencies=[Depends(require_admin)])
async def revoke_tenant_key(
    name: str, key_id: str, state: ServerState = Depends(server_state)
) -> dict:
    return await _revoke_key(state, await _tenant_named(state, name), key_id)


async def key_owner(tenant: Tenant = Depends(current_tenant)) -> Tenant:
    """The tenant managing its own keys: a tenant key is needed (not the admin's, not none)."""
    if tenant.is_public:
        raise APIError(
            403,
            "Use a tenant's API key to manage its keys (the admin uses /v1/tenants/NAME/keys).",
            "tenant_key_required",
        )
    return tenant


@router.post("/v1/keys", status_code=201)
async def create_own_key(
    request: Request,
    tenant: Tenant = Depends(key_owner),
    state: ServerState = Depends(server_state),
) -> dict:
    return await _create_key(request, state, tenant)


@router.get("/v1/keys")
async def list_own_keys(
    tenant: Tenant = Depends(key_owner), state: ServerState = Depends(server_state)
) -> dict:
    return await _list_keys(state, tenant)


@router.delete("/v1/keys/{key_id}")
async def revoke_own_key(
    key_id: str, tenant: Tenant = Depends(key_owner), state: ServerState = Depends(server_state)
) -> dict:
    return await _revoke_key(state, tenant, key_id)


# ---- usage -------------------------------------------------------------------------------------

_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


def parse_day(value: str | None, param: str, default: date) -> date:
    if value is None:
        return default
    try:
        if not _DATE.fullmatch(value):
            raise ValueError(value)
        return date.fromisoformat(value)
    except ValueError:
        raise APIError(
            400, f"`{param}` must be a date as YYYY-MM-DD.", "invalid_date", param
        ) from None


def usage_range(start: str | None, end: str | None) -> tuple[date, date]:
    """The inclusive UTC day range of a usage query: default the last 30 days."""
    last = parse_day(end, "end", utc_today())
    first = parse_day(start, "start", last - timedelta(days=DEFAULT_USAGE_DAYS - 1))
    if first > last:
        raise APIError(400, "`start` is after `end`.", "invalid_date", "start")
    if (last - first).days >= MAX_USAGE_DAYS:
        raise APIError(
            400, f"Ask for at most {MAX_USAGE_DAYS} days at once.", "invalid_date", "start"
        )
    return first, last


def usage_dict(row: UsageRow, base_name: str) -> dict:
    return {
        "object": "usage",
        "date": row.day.isoformat(),
        "tenant": row.tenant_name,
        "model": row.adapter or base_name,
        "requests": row.requests,
        "prompt_tokens": row.prompt_tokens,
        "completion_tokens": row.completion_tokens,
        "total_tokens": row.prompt_tokens + row.completion_tokens,
    }


@router.get("/v1/usage")
async def get_usage(
    request: Request,
    tenant: Tenant = Depends(current_tenant),
    state: ServerState = Depends(server_state),
) -> dict:
    """Requests and tokens per day and model. A tenant: its own; the admin: every tenant's, or
    one's with `tenant=NAME`."""
    start, end = usage_range(request.query_params.get("start"), request.query_params.get("end"))
    wanted = request.query_params.get("tenant")
    registry = state.adapters.registry
    if is_admin_request(request, state):
        tenant_id = None
        if wanted:
            found = await run_in_threadpool(registry.tenant_by_name, wanted, True)
            if found is None:
                raise APIError(404, f"Tenant `{wanted}` does not exist.", "tenant_not_found")
            tenant_id = found.id
    else:
        if wanted and wanted != tenant.name:
            raise APIError(403, "Only the admin may read another tenant's usage.", "admin_required")
        tenant_id = tenant.id
    if state.usage is not None:
        try:  # what this process counted so far, so a client reads its own requests back
            await run_in_threadpool(state.usage.flush)
        except Exception:  # noqa: BLE001 - the rows stay buffered; answer with what is stored
            log.exception("flushing the usage ledger failed")
    rows = await run_in_threadpool(registry.usage, tenant_id, start, end)
    return {
        "object": "list",
        "start": start.isoformat(),
        "end": end.isoformat(),
        "data": [usage_dict(r, state.base_name) for r in rows],
    }

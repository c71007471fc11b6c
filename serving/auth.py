"""Authentication: `Authorization: Bearer KEY` names a tenant (or the admin)."""

from __future__ import annotations

from fastapi import Depends, Request

from adapters.keys import keys_equal
from adapters.registry import Tenant
from serving.errors import APIError
from serving.state import ServerState, server_state


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def _is_admin(state: ServerState, key: str | None) -> bool:
    admin = state.settings.admin_key
    return key is not None and admin is not None and keys_equal(key, admin.get_secret_value())


async def current_tenant(request: Request, state: ServerState = Depends(server_state)) -> Tenant:
    """The tenant a request acts for. Without required auth, unknown callers are `public`."""
    key = _bearer(request)
    tenant = state.catalog.registry.tenant_by_key(key) if key else None
    if tenant is not None:
        return tenant
    if _is_admin(state, key) or not state.settings.requires_auth:
        return state.catalog.public
    if key is None:
        raise APIError(401, "Missing API key: send `Authorization: Bearer KEY`.", "missing_api_key")
    raise APIError(401, "Invalid API key.", "invalid_api_key")


async def require_admin(request: Request, state: ServerState = Depends(server_state)) -> None:
    key = _bearer(request)
    if state.settings.admin_key is None:
        raise APIError(
            403, "Admin routes are disabled: no admin key is configured.", "admin_disabled"
        )
    if key is None:
        raise APIError(401, "Missing API key: send `Authorization: Bearer KEY`.", "missing_api_key")
    if not _is_admin(state, key):
        raise APIError(403, "This route needs the admin key.", "admin_required")


def is_admin_request(request: Request, state: ServerState) -> bool:
    return _is_admin(state, _bearer(request))

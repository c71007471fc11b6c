"""Authentication: `Authorization: Bearer KEY` names a tenant (or the admin).

`Authenticator.authenticate` is a plain async function of the key; the FastAPI dependencies at
the bottom only pull the key out of the request. Key lookups go through a `LookupCache` keyed by
the key's hash: a revoked key or a deleted tenant stops working here at once (a registry write
in this process drops the cache), on other replicas within `ttl`."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Depends, Request

from adapters.keys import hash_key, keys_equal
from adapters.registry import Registry, Tenant
from serving.errors import APIError
from serving.lookup_cache import LookupCache
from serving.state import ServerState, server_state


@dataclass(frozen=True)
class Caller:
    """Who sent a request. `anonymous`: no valid tenant key and auth not required; such a caller
    acts as the `public` tenant and may read and generate, never write."""

    tenant: Tenant
    is_admin: bool = False
    anonymous: bool = False


class Authenticator:
    def __init__(
        self,
        registry: Registry,
        public: Tenant,
        *,
        admin_key: str | None,
        requires_auth: bool,
        ttl: float = 2.0,
    ) -> None:
        self.registry = registry
        self.public = public
        self._admin_key = admin_key
        self.requires_auth = requires_auth
        self._cache: LookupCache[Tenant | None] = LookupCache(registry, ttl)

    def invalidate(self) -> None:
        self._cache.clear()

    def is_admin_key(self, key: str | None) -> bool:
        return key is not None and self._admin_key is not None and keys_equal(key, self._admin_key)

    async def tenant_for_key(self, key: str) -> Tenant | None:
        return await self._cache.get(hash_key(key), lambda: self.registry.tenant_by_key(key))

    async def authenticate(self, key: str | None) -> Caller:
        """The caller a key names, or a 401 when auth is required and the key names nobody."""
        if self.is_admin_key(key):
            return Caller(self.public, is_admin=True)
        tenant = await self.tenant_for_key(key) if key else None
        if tenant is not None:
            return Caller(tenant)
        if not self.requires_auth:
            return Caller(self.public, anonymous=True)
        if key is None:
            raise APIError(
                401, "Missing API key: send `Authorization: Bearer KEY`.", "missing_api_key"
            )
        raise APIError(401, "Invalid API key.", "invalid_api_key")


def bearer_key(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


async def current_caller(request: Request, state: ServerState = Depends(server_state)) -> Caller:
    return await state.auth.authenticate(bearer_key(request))


async def current_tenant(caller: Caller = Depends(current_caller)) -> Tenant:
    """The tenant a request acts for. Without required auth, unknown callers are `public`."""
    return caller.tenant


async def require_admin(request: Request, state: ServerState = Depends(server_state)) -> None:
    key = bearer_key(request)
    if state.settings.admin_key is None:
        raise APIError(
            403, "Admin routes are disabled: no admin key is configured.", "admin_disabled"
        )
    if key is None:
        raise APIError(401, "Missing API key: send `Authorization: Bearer KEY`.", "missing_api_key")
    if not state.auth.is_admin_key(key):
        raise APIError(403, "This route needs the admin key.", "admin_required")


def is_admin_request(request: Request, state: ServerState) -> bool:
    return state.auth.is_admin_key(bearer_key(request))


async def require_writer(
    caller: Caller = Depends(current_caller), state: ServerState = Depends(server_state)
) -> Caller:
    """Writes (uploads, deletions) need a tenant key or the admin key. Without an admin key the
    server is single-user: only the static `--lora` adapters, no uploads."""
    if state.settings.admin_key is None:
        raise APIError(
            403,
            "Adapter uploads are off: this server has no admin key, so it serves only the "
            "adapters given at start-up (--lora). Set TENANTLORA_ADMIN_KEY to create tenants.",
            "uploads_disabled",
        )
    if caller.anonymous:
        raise APIError(403, "Changing adapters needs a tenant API key.", "tenant_key_required")
    return caller

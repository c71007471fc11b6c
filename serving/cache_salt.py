"""Private prefix caches: the server, not the client, sets vLLM's `cache_salt`.

vLLM keys its cached KV blocks by adapter and `cache_salt`, so two tenants sending the same
prompt to the base model (or to the same public adapter) would share blocks, and the time to
first token would tell one tenant what another sent (the class of CVE-2025-46570). Every request
gets a salt derived from a per-process secret and its tenant id; a client's own `cache_salt` is
mixed in under its tenant (it can split its own cache further, never join another tenant's).
The prefix cache lives in this process's engine, so a per-process secret is enough."""

from __future__ import annotations

import hashlib
import hmac
import secrets


class CacheSalts:
    def __init__(self, share_base: bool = False, secret: bytes | None = None) -> None:
        self.share_base = share_base
        self._secret = secret or secrets.token_bytes(32)

    def salt_for(self, tenant_id: int, client_salt: str | None, on_base: bool) -> str | None:
        """The salt to run with. None (shared) only for the base model when sharing is on
        and the client asked for no salt of its own."""
        if self.share_base and on_base and not client_salt:
            return None
        message = f"{tenant_id}\x00{client_salt or ''}".encode()
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()

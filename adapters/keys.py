"""API keys: random, shown once, stored only as a SHA-256 digest.

Keys carry 256 bits of randomness, so a fast unsalted hash is enough: there is nothing to
brute-force, and a fast hash lets every request be checked with one indexed lookup. A key's first
few characters (`prefix`) are kept in clear so people can tell their keys apart in a list; they
reveal 30 of the 256 random bits."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

KEY_PREFIX = "tl-"
DISPLAY_PREFIX_LEN = 8  # "tl-" and five random characters


def new_api_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def key_prefix(key: str) -> str:
    """The part of a key that may be shown again after creation, e.g. `tl-AbC12`."""
    return key[:DISPLAY_PREFIX_LEN]


def keys_equal(presented: str, expected: str) -> bool:
    return hmac.compare_digest(presented.encode("utf-8"), expected.encode("utf-8"))


@dataclass(frozen=True)
class ApiKey:
    """One of a tenant's keys, as stored: never the key itself, nor its hash."""

    id: int
    tenant_id: int
    prefix: str
    name: str | None
    created_at: float
    expires_at: float | None
    revoked_at: float | None
    last_used_at: float | None

    def is_active(self, now: float) -> bool:
        return self.revoked_at is None and (self.expires_at is None or self.expires_at > now)

    def public_dict(self, now: float) -> dict:
        return {
            "id": self.id,
            "object": "api_key",
            "prefix": self.prefix,
            "name": self.name,
            "created": int(self.created_at),
            "expires_at": _int_or_none(self.expires_at),
            "revoked_at": _int_or_none(self.revoked_at),
            "last_used_at": _int_or_none(self.last_used_at),
            "active": self.is_active(now),
        }


def _int_or_none(value: float | None) -> int | None:
    return None if value is None else int(value)

"""API keys: random, shown once, stored only as a SHA-256 digest.

Keys carry 256 bits of randomness, so a fast unsalted hash is enough: there is nothing to
brute-force, and a fast hash lets every request be checked with one indexed lookup."""

from __future__ import annotations

import hashlib
import hmac
import secrets

KEY_PREFIX = "tl-"


def new_api_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def keys_equal(presented: str, expected: str) -> bool:
    return hmac.compare_digest(presented.encode("utf-8"), expected.encode("utf-8"))

"""Per-tenant requests-per-minute and tokens-per-minute limits on the `limits` library.

Counters are sliding window counters (two counters per limit, O(1) in the store), kept where
`rate_limit_storage` says: `memory://` (this process, reset on restart) or `redis://host:port`
(shared by every replica on the store, kept across restarts). All calls go through `limits.aio`,
so the event loop never blocks on the store. A store that fails lets requests through (logged):
a broken counter store must not take the service down."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

from limits import RateLimitItem, RateLimitItemPerSecond
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from limits.errors import StorageError
from limits.storage import storage_from_string

log = logging.getLogger(__name__)

# Far above any real limit: charges and refunds after admission must always go through.
_UNBOUNDED = 2**62
_REDIS_SCHEMES = ("redis", "rediss", "redis+unix", "redis+sentinel", "redis+cluster")


def async_storage(url: str):
    """A `limits.aio` storage for `memory://` or a Redis URL (through the `redis` client)."""
    scheme = url.split("://", 1)[0]
    if not scheme.startswith("async+"):
        url, scheme = f"async+{url}", f"async+{scheme}"
    options: dict = {"wrap_exceptions": True}
    if scheme.removeprefix("async+") in _REDIS_SCHEMES:
        options["implementation"] = "redispy"
    return storage_from_string(url, **options)


class RateLimited(Exception):
    """Over a requests or tokens limit; `reason` names which."""

    def __init__(self, reason: str, message: str, retry_after: float, headers: dict[str, str]):
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.retry_after = retry_after
        self.headers = headers


@dataclass
class Charge:
    """What one request took from its tenant's budgets, and OpenAI's `x-ratelimit-*` headers."""

    key: str
    tokens_limit: int | None
    tokens: int
    requests_limit: int | None
    headers: dict[str, str] = field(default_factory=dict)


def duration(seconds: float) -> str:
    """OpenAI's reset format: `250ms`, `12s`, `6m0s`."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    whole = math.ceil(seconds)
    minutes, secs = divmod(whole, 60)
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


class RateLimits:
    """Requests and tokens per window for each tenant key (a minute in production)."""

    def __init__(self, storage_url: str = "memory://", window_seconds: int = 60) -> None:
        self.storage = async_storage(storage_url)
        self.limiter = SlidingWindowCounterRateLimiter(self.storage)
        self.window = window_seconds

    def _item(self, kind: str, amount: int) -> RateLimitItem:
        return RateLimitItemPerSecond(amount, self.window, namespace=f"tenantlora-{kind}")

    async def charge(
        self, key: str, requests_limit: int | None, tokens_limit: int | None, tokens: int
    ) -> Charge:
        """Take one request and `tokens` tokens from the budgets of `key`, or raise RateLimited
        (then nothing is taken)."""
        charge = Charge(key, tokens_limit, 0, requests_limit)
        try:
            if requests_limit is not None:
                item = self._item("requests", requests_limit)
                if not await self.limiter.hit(item, key):
                    raise await self._refusal(
                        "requests_per_minute",
                        f"Rate limit reached: {requests_limit} requests per {self._per()}.",
                        item,
                        key,
                        charge,
                    )
            if tokens_limit is not None:
                item = self._item("tokens", tokens_limit)
                if tokens > tokens_limit or not await self.limiter.hit(item, key, cost=tokens):
                    if requests_limit is not None:
                        await self._adjust(self._item("requests", requests_limit), key, -1)
                    too_big = tokens > tokens_limit
                    raise await self._refusal(
                        "tokens_per_minute",
                        f"Request too large: it may use {tokens} tokens, over the limit of "
                        f"{tokens_limit} tokens per {self._per()}; lower max_tokens."
                        if too_big
                        else f"Rate limit reached: {tokens_limit} tokens per {self._per()} "
                        f"(this request may use {tokens}).",
                        item,
                        key,
                        charge,
                    )
                charge.tokens = tokens
            charge.headers = await self.headers(charge)
        except StorageError:
            log.warning("rate-limit store unavailable; request let through", exc_info=True)
        return charge

    async def settle(self, charge: Charge, tokens: int) -> None:
        """Correct the tokens charged to the real count (a refund when fewer were used)."""
        if charge.tokens_limit is None or tokens == charge.tokens:
            return
        delta, charge.tokens = tokens - charge.tokens, tokens
        try:
            await self._adjust(self._item("tokens", charge.tokens_limit), charge.key, delta)
        except StorageError:
            log.warning("rate-limit store unavailable; token count not settled", exc_info=True)

    async def refund(self, charge: Charge) -> None:
        """Give back everything `charge` took (the request was never served)."""
        try:
            if charge.requests_limit is not None:
                await self._adjust(self._item("requests", charge.requests_limit), charge.key, -1)
            await self.settle(charge, 0)
        except StorageError:
            log.warning("rate-limit store unavailable; refund lost", exc_info=True)

    async def headers(self, charge: Charge) -> dict[str, str]:
        """`x-ratelimit-{limit,remaining,reset}-{requests,tokens}` for the limits that are set."""
        headers: dict[str, str] = {}
        now = time.time()
        for kind, limit in (("requests", charge.requests_limit), ("tokens", charge.tokens_limit)):
            if limit is None:
                continue
            stats = await self.limiter.get_window_stats(self._item(kind, limit), charge.key)
            headers[f"x-ratelimit-limit-{kind}"] = str(limit)
            headers[f"x-ratelimit-remaining-{kind}"] = str(stats.remaining)
            headers[f"x-ratelimit-reset-{kind}"] = duration(stats.reset_time - now)
        return headers

    async def _adjust(self, item: RateLimitItem, key: str, delta: int) -> None:
        """Add `delta` (negative: give back, never below zero) to the current window's counter.
        Uses the storage's public sliding-window calls with an unbounded limit, so it always
        goes through; the same calls on memory and Redis stores."""
        storage_key, expiry = item.key_for(key), item.get_expiry()
        if delta < 0:
            _, _, current, _ = await self.storage.get_sliding_window(storage_key, expiry)
            delta = -min(-delta, current)
        if delta:
            await self.storage.acquire_sliding_window_entry(storage_key, _UNBOUNDED, expiry, delta)

    async def _refusal(
        self, reason: str, message: str, item: RateLimitItem, key: str, charge: Charge
    ) -> RateLimited:
        stats = await self.limiter.get_window_stats(item, key)
        retry_after = max(1.0, stats.reset_time - time.time())
        return RateLimited(reason, message, retry_after, await self.headers(charge))

    def _per(self) -> str:
        return "minute" if self.window == 60 else f"{self.window} s"

    async def reset(self) -> None:
        """Forget every counter (tests)."""
        await self.storage.reset()

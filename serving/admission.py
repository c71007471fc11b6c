"""Admission of each request: per-tenant caps and limits, then a fair place in the engine.

`Admission.admit(tenant, request)` checks, in order:
1. `n` and the number of prompts against the tenant's caps (400);
2. requests in flight or queued for the tenant against `max_concurrent` (429, per replica);
3. requests and tokens per minute (429; counters in `rate_limit_storage`, shared by replicas
   on Redis). Tokens are the estimated prompt tokens plus the completion tokens the request may
   produce; `Ticket.settle` corrects them to the real count;
4. a slot in the engine (`admission_max_in_flight`), waiting in a weighted fair queue when the
   engine is saturated (429 when the queue is full or the wait times out).
It returns a `Ticket`: the vLLM priority for the request, OpenAI's `x-ratelimit-*` headers, and
`release()`, which the request path calls exactly once when the request is over (any path)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections import Counter as Tally
from dataclasses import dataclass
from typing import Any

from serving import metrics
from serving.errors import APIError
from serving.fair_queue import FairQueue, QueueFull, QueueTimeout
from serving.rate_limits import Charge, RateLimited, RateLimits
from serving.settings import Settings

log = logging.getLogger(__name__)

# Prompt tokens are estimated from text length before tokenizing (the usual ~4 characters per
# token of English text, plus a few template tokens per chat message); settle() corrects them.
CHARS_PER_TOKEN = 4
TOKENS_PER_MESSAGE = 4

# Why a request can be refused (the `reason` label of tenantlora_admission_refused).
REASONS = (
    "max_n",
    "max_prompts",
    "concurrency",
    "requests_per_minute",
    "tokens_per_minute",
    "queue_full",
    "queue_timeout",
)


@dataclass(frozen=True)
class TenantLimits:
    """A tenant's limits: its own overrides, else the server's defaults (None: no limit)."""

    max_concurrent: int | None
    requests_per_minute: int | None
    tokens_per_minute: int | None
    max_n: int
    max_prompts: int
    weight: float

    @classmethod
    def of(cls, tenant: Any, settings: Settings) -> TenantLimits:
        def pick(name: str) -> Any:
            value = getattr(tenant, name, None)
            return getattr(settings, f"tenant_{name}") if value is None else value

        return cls(*(pick(name) for name in cls.__dataclass_fields__))


@dataclass(frozen=True)
class RequestSize:
    prompts: int
    n: int
    prompt_tokens: int  # estimated, all prompts together
    completion_tokens: int  # the most the request may produce, all sequences together

    @property
    def sequences(self) -> int:
        return self.prompts * self.n

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def _text_tokens(chars: int) -> int:
    return math.ceil(chars / CHARS_PER_TOKEN)


def _message_tokens(message: Any) -> int:
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, str):
        chars = len(content)
    elif isinstance(content, list):
        chars = sum(len(p.get("text") or "") for p in content if isinstance(p, dict))
    else:
        chars = 0
    return TOKENS_PER_MESSAGE + _text_tokens(chars)


def _prompts(prompt: Any) -> list[int]:
    """Estimated tokens of each prompt of a completion request (text or token ids)."""
    if prompt is None:
        return [0]
    if isinstance(prompt, str):
        return [_text_tokens(len(prompt))]
    if prompt and isinstance(prompt[0], str | list):
        return [_text_tokens(len(p)) if isinstance(p, str) else len(p) for p in prompt]
    return [len(prompt)]  # one prompt of token ids


def request_size(request: Any, max_model_len: int) -> RequestSize:
    """Size of a vLLM ChatCompletionRequest or CompletionRequest, before tokenizing."""
    if hasattr(request, "messages"):
        per_prompt = [sum(_message_tokens(m) for m in request.messages)]
        # max_tokens is deprecated on chat requests (reading the attribute warns).
        max_out = request.max_completion_tokens or vars(request).get("max_tokens")
    else:
        per_prompt = _prompts(request.prompt)
        max_out = request.max_tokens
    n = request.n or 1
    completion = sum(
        n * min(max_out or max_model_len, max(1, max_model_len - p)) for p in per_prompt
    )
    return RequestSize(len(per_prompt), n, sum(per_prompt), completion)


class Ticket:
    """One admitted request: its engine priority, the rate-limit headers for its response,
    and its slot, released exactly once by `release()`."""

    def __init__(
        self,
        admission: Admission,
        tenant: str,
        priority: int,
        headers: dict[str, str],
        charge: Charge,
        queue_wait: float,
    ) -> None:
        self._admission = admission
        self._tenant = tenant
        self._charge = charge
        self._released = False
        self.priority = priority
        self.headers = headers
        self.queue_wait = queue_wait

    def settle(self, prompt_tokens: int, completion_tokens: int) -> None:
        """Charge the real token count instead of the estimate (runs in the background)."""
        self._admission._background(
            self._admission.rate_limits.settle(self._charge, prompt_tokens + completion_tokens)
        )

    def release(self) -> None:
        """Free the slot and wake the next waiter. Safe to call more than once."""
        if not self._released:
            self._released = True
            self._admission._release(self._tenant)


class Admission:
    def __init__(self, settings: Settings, window_seconds: int = 60) -> None:
        self.settings = settings
        self.rate_limits = RateLimits(settings.rate_limit_storage, window_seconds)
        self.queue = FairQueue(
            settings.admission_max_in_flight,
            settings.admission_queue_size,
            fair=settings.fair_admission,
        )
        self._in_flight: Tally[str] = Tally()  # per tenant, in the engine, this replica
        self._active: Tally[str] = Tally()  # per tenant, being admitted, queued or in flight
        self._tasks: set[asyncio.Task] = set()
        self._seen: set[str] = set()  # tenants whose series exist
        self._weights: dict[str, float] = {}  # each tenant's weight, as last admitted

    def limits(self, tenant: Any) -> TenantLimits:
        return TenantLimits.of(tenant, self.settings)

    def in_flight(self, tenant: str) -> int:
        return self._in_flight[tenant]

    async def admit(self, tenant: Any, request: Any) -> Ticket:
        """Admit `request` for `tenant` or raise APIError (400 over a cap, 429 over a limit)."""
        name = tenant.name
        self._init_series(name)
        limits = self.limits(tenant)
        size = request_size(request, self.settings.max_model_len)
        self._check_size(name, limits, size)
        if limits.max_concurrent is not None and self._active[name] >= limits.max_concurrent:
            self._refuse(name, "concurrency")
            raise APIError(
                429,
                f"Too many requests at once: the limit is {limits.max_concurrent} "
                "concurrent requests.",
                "rate_limit_exceeded",
                headers={"Retry-After": "1"},
            )
        self._active[name] += 1  # held from here until release, or given back on refusal
        self._weights[name] = limits.weight
        try:
            return await self._admit(tenant, name, limits, size)
        except BaseException:
            self._forget(self._active, name)
            raise

    async def _admit(
        self, tenant: Any, name: str, limits: TenantLimits, size: RequestSize
    ) -> Ticket:
        try:
            charge = await self.rate_limits.charge(
                str(tenant.id), limits.requests_per_minute, limits.tokens_per_minute, size.tokens
            )
        except RateLimited as exc:
            self._refuse(name, exc.reason)
            headers = {"Retry-After": str(math.ceil(exc.retry_after)), **exc.headers}
            raise APIError(429, exc.message, "rate_limit_exceeded", headers=headers) from exc

        if self._below_fair_share(name) and self.queue.grant_now(
            name, limits.weight, size.sequences, ceiling=self._burst_ceiling()
        ):
            return self._ticket(name, limits, size, charge, 0.0)
        metrics.ADMISSION_QUEUED.labels(name).inc()
        try:
            waited = await self.queue.acquire(
                name,
                weight=limits.weight,
                cost=size.sequences,
                timeout=self.settings.admission_queue_timeout,
            )
        except (QueueFull, QueueTimeout) as exc:
            self._background(self.rate_limits.refund(charge))
            reason = "queue_full" if isinstance(exc, QueueFull) else "queue_timeout"
            self._refuse(name, reason)
            raise APIError(
                429,
                "The server is busy with other requests; try again shortly.",
                "rate_limit_exceeded",
                headers={"Retry-After": "1" if reason == "queue_full" else "5", **charge.headers},
            ) from exc
        except asyncio.CancelledError:
            self._background(self.rate_limits.refund(charge))
            raise
        finally:
            metrics.ADMISSION_QUEUED.labels(name).dec()
        return self._ticket(name, limits, size, charge, waited)

    def _ticket(
        self, name: str, limits: TenantLimits, size: RequestSize, charge: Charge, waited: float
    ) -> Ticket:
        # vLLM priority (lower runs earlier): this tenant's work in the engine, per unit weight.
        priority = int(self._in_flight[name] / limits.weight)
        self._in_flight[name] += 1
        metrics.ADMISSION_IN_FLIGHT.labels(name).inc()
        metrics.ADMISSION_QUEUE_WAIT.labels(name).observe(waited)
        metrics.ADMISSION_TOKENS.labels(name).inc(size.tokens)
        return Ticket(self, name, priority, charge.headers, charge, waited)

    def _below_fair_share(self, name: str) -> bool:
        """Whether this tenant holds fewer engine slots than its weighted share among the
        tenants with work here now. Such a tenant skips the queue (fair admission only)."""
        if not self.settings.fair_admission:
            return False
        weights = sum(self._weights[k] for k in self._active)  # tenants with work now
        share = self.settings.admission_max_in_flight * self._weights[name] / weights
        return self._in_flight[name] < share

    def _burst_ceiling(self) -> int:
        """Most requests in the engine at once, counting those past the queue's capacity:
        twice the capacity, never more sequences than the engine schedules in one step."""
        return min(2 * self.settings.admission_max_in_flight, self.settings.max_num_seqs)

    def _check_size(self, tenant: str, limits: TenantLimits, size: RequestSize) -> None:
        if size.n > limits.max_n:
            self._refuse(tenant, "max_n")
            raise APIError(
                400, f"`n` is {size.n}; the most this server allows is {limits.max_n}.",
                "invalid_n", "n",
            )  # fmt: skip
        if size.prompts > limits.max_prompts:
            self._refuse(tenant, "max_prompts")
            raise APIError(
                400,
                f"The request has {size.prompts} prompts; the most this server allows is "
                f"{limits.max_prompts}.",
                "invalid_prompt",
                "prompt",
            )

    def _init_series(self, tenant: str) -> None:
        """Export a tenant's refusal counters at 0 from its first request, so rate() and the
        dashboard see them before the first refusal."""
        if tenant not in self._seen:
            self._seen.add(tenant)
            for reason in REASONS:
                metrics.ADMISSION_REFUSED.labels(tenant, reason)
            metrics.ADMISSION_QUEUED.labels(tenant)  # at 0 also when it never had to queue

    def forget_tenant(self, tenant: str) -> None:
        """Drop a deleted tenant's admission series."""
        self._seen.discard(tenant)
        self._weights.pop(tenant, None)
        for metric in (
            metrics.ADMISSION_QUEUE_WAIT,
            metrics.ADMISSION_IN_FLIGHT,
            metrics.ADMISSION_QUEUED,
            metrics.ADMISSION_TOKENS,
        ):
            with contextlib.suppress(KeyError):
                metric.remove(tenant)
        for reason in REASONS:
            with contextlib.suppress(KeyError):
                metrics.ADMISSION_REFUSED.remove(tenant, reason)

    def _refuse(self, tenant: str, reason: str) -> None:
        metrics.ADMISSION_REFUSED.labels(tenant, reason).inc()

    @staticmethod
    def _forget(tally: Tally[str], tenant: str) -> None:
        tally[tenant] -= 1
        if tally[tenant] <= 0:
            del tally[tenant]

    def _release(self, tenant: str) -> None:
        self._forget(self._in_flight, tenant)
        self._forget(self._active, tenant)
        metrics.ADMISSION_IN_FLIGHT.labels(tenant).dec()
        self.queue.release()

    def _background(self, coro) -> None:
        """Run a counter update without holding up the request."""
        try:
            task = asyncio.get_running_loop().create_task(coro)
        except RuntimeError:  # no loop: called from a thread
            coro.close()
            log.warning("rate-limit update dropped: no running event loop")
            return
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def flush(self) -> None:
        """Wait for pending counter updates (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

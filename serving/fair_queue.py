"""Admission gate in front of the engine: at most `capacity` requests in flight; the rest wait
in per-tenant FIFO queues served by start-time fair queuing (SFQ, Goyal et al. 1996).

Each waiter gets a start tag `max(V, the tenant's last finish tag)` and a finish tag
`start + cost / weight`; a free slot goes to the queue head with the smallest start tag, and V
becomes that tag. A tenant that sent little recently therefore goes ahead of another's backlog,
an idle tenant banks no credit, and under steady load tenants get slots in proportion to their
weights. With `fair=False` the gate is first come first served (the comparison case).

The total number of waiters is bounded: when the queue is full, a newcomer pushes out the last
waiter of the longest queue if that queue is longer than the newcomer's own would be, and is
refused otherwise, so a flood only ever refuses the flooding tenant. Waiters that time out or
are cancelled (the client went away) leave the queue at once."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from dataclasses import dataclass, field


class QueueFull(Exception):
    """The queue was full and this request was the one to go."""


class QueueTimeout(Exception):
    """The request waited longer than the timeout."""


@dataclass(eq=False)
class _Waiter:
    key: str
    start: float
    finish: float
    seq: int
    future: asyncio.Future = field(repr=False)
    granted: bool = False


class FairQueue:
    def __init__(self, capacity: int, max_waiting: int, fair: bool = True) -> None:
        self.capacity = capacity
        self.max_waiting = max_waiting
        self.fair = fair
        self.in_flight = 0
        self._queues: dict[str, deque[_Waiter]] = {}
        self._last_finish: dict[str, float] = {}
        self._vtime = 0.0
        self._seq = itertools.count()

    def waiting(self, key: str | None = None) -> int:
        if key is not None:
            return len(self._queues.get(key, ()))
        return sum(len(q) for q in self._queues.values())

    async def acquire(
        self, key: str, weight: float = 1.0, cost: float = 1.0, timeout: float | None = None
    ) -> float:
        """Wait for a slot; return the seconds waited. Raises QueueFull or QueueTimeout."""
        started = time.monotonic()
        start = max(self._vtime, self._last_finish.get(key, 0.0))
        waiter = _Waiter(
            key,
            start,
            start + cost / weight,
            next(self._seq),
            asyncio.get_running_loop().create_future(),
        )
        if self.in_flight < self.capacity and not self.waiting():
            self._last_finish[key] = waiter.finish
            self._grant(waiter)
            return 0.0
        self._make_room(key)
        self._last_finish[key] = waiter.finish
        self._queues.setdefault(key, deque()).append(waiter)
        try:
            async with asyncio.timeout(timeout):
                await waiter.future
        except TimeoutError:
            if not waiter.granted:
                self._remove(waiter)
                raise QueueTimeout from None
        except asyncio.CancelledError:
            if waiter.granted:
                self.release()  # the slot came, but the caller is gone
            else:
                self._remove(waiter)
            raise
        return time.monotonic() - started

    def grant_now(self, key: str, weight: float = 1.0, cost: float = 1.0, ceiling: int = 0) -> bool:
        """Take a slot at once, past `capacity` up to `ceiling` (for a tenant below its fair
        share while others' backlog fills the engine: without it, a light tenant would wait for
        a heavy one's requests to finish). Its virtual-time claim is charged as if it queued."""
        if self.in_flight >= max(ceiling, self.capacity):
            return False
        start = max(self._vtime, self._last_finish.get(key, 0.0))
        self._last_finish[key] = start + cost / weight
        self.in_flight += 1
        return True

    def release(self) -> None:
        """Free one slot and hand it to the next waiter."""
        self.in_flight -= 1
        self._dispatch()

    def _grant(self, waiter: _Waiter) -> None:
        self.in_flight += 1
        self._vtime = max(self._vtime, waiter.start)
        waiter.granted = True
        if not waiter.future.done():
            waiter.future.set_result(None)

    def _dispatch(self) -> None:
        while self.in_flight < self.capacity:
            waiter = self._next()
            if waiter is None:
                return
            self._queues[waiter.key].popleft()
            if not self._queues[waiter.key]:
                del self._queues[waiter.key]
            if waiter.future.done():  # cancelled; its handler has not run yet
                continue
            self._grant(waiter)
        self._forget_idle()

    def _next(self) -> _Waiter | None:
        heads = [q[0] for q in self._queues.values()]
        if not heads:
            return None
        if self.fair:
            return min(heads, key=lambda w: (w.start, w.seq))
        return min(heads, key=lambda w: w.seq)

    def _make_room(self, key: str) -> None:
        if self.waiting() < self.max_waiting:
            return
        own = len(self._queues.get(key, ()))
        longest = max(self._queues, key=lambda k: len(self._queues[k]), default=None)
        if not self.fair or longest is None or len(self._queues[longest]) <= own + 1:
            raise QueueFull
        victim = self._queues[longest][-1]
        self._remove(victim)
        if not victim.future.done():
            victim.future.set_exception(QueueFull())

    def _remove(self, waiter: _Waiter) -> None:
        queue = self._queues.get(waiter.key)
        if queue is None or waiter not in queue:
            return
        if queue[-1] is waiter:  # the tenant's last word: undo its claim on future slots
            self._last_finish[waiter.key] = waiter.start
        queue.remove(waiter)
        if not queue:
            del self._queues[waiter.key]

    def _forget_idle(self) -> None:
        """Drop finish tags V has passed (they no longer matter) so the map stays small."""
        if len(self._last_finish) > 1024:
            for key in [k for k, f in self._last_finish.items() if f <= self._vtime]:
                if key not in self._queues:
                    del self._last_finish[key]

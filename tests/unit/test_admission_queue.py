"""The fair queue in front of the engine (serving.fair_queue), without an engine."""

from __future__ import annotations

import asyncio

import pytest

from serving.fair_queue import FairQueue, QueueFull, QueueTimeout

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


class Recorder:
    """Runs waiters as tasks and records the order in which they got a slot."""

    def __init__(self, queue: FairQueue) -> None:
        self.queue = queue
        self.order: list[str] = []
        self.tasks: dict[str, asyncio.Task] = {}

    async def add(self, label: str, key: str, weight: float = 1.0, cost: float = 1.0, **kw):
        async def run():
            await self.queue.acquire(key, weight, cost, **kw)
            self.order.append(label)

        self.tasks[label] = asyncio.create_task(run())
        await _settle()

    async def serve(self, count: int) -> None:
        """Release `count` slots, one at a time."""
        for _ in range(count):
            self.queue.release()
            await _settle()


async def test_capacity_then_wait_for_release():
    queue = FairQueue(capacity=2, max_waiting=10)
    rec = Recorder(queue)
    for label in "xyz":
        await rec.add(label, "a")
    assert rec.order == ["x", "y"] and queue.in_flight == 2 and queue.waiting("a") == 1
    await rec.serve(1)
    assert rec.order == ["x", "y", "z"] and queue.in_flight == 2 and queue.waiting() == 0


async def test_newcomer_goes_ahead_of_a_backlog():
    queue = FairQueue(capacity=1, max_waiting=100)
    rec = Recorder(queue)
    for i in range(6):
        await rec.add(f"a{i}", "a")
    await rec.add("b0", "b")
    await rec.serve(6)
    assert rec.order == ["a0", "b0", "a1", "a2", "a3", "a4", "a5"]


async def test_first_come_first_served_when_fairness_is_off():
    queue = FairQueue(capacity=1, max_waiting=100, fair=False)
    rec = Recorder(queue)
    for i in range(4):
        await rec.add(f"a{i}", "a")
    await rec.add("b0", "b")
    await rec.serve(4)
    assert rec.order == ["a0", "a1", "a2", "a3", "b0"]


@pytest.mark.parametrize(
    ("first", "second", "slots", "first_share"),
    [
        ({"weight": 2.0}, {"weight": 1.0}, 30, 20),  # slots 2:1 by weight
        ({"cost": 1.0}, {"cost": 4.0}, 10, 8),  # four small requests for each big one
    ],
)
async def test_backlogged_tenants_share_in_proportion(first, second, slots, first_share):
    queue = FairQueue(capacity=1, max_waiting=100)
    rec = Recorder(queue)
    await rec.add("hold", "x")
    for i in range(slots):
        await rec.add(f"a{i}", "a", **first)
        await rec.add(f"b{i}", "b", **second)
    await rec.serve(slots)
    served = rec.order[1:]
    assert sum(1 for label in served if label.startswith("a")) == first_share, served


async def test_cancelled_waiter_leaves_the_queue():
    queue = FairQueue(capacity=1, max_waiting=10)
    rec = Recorder(queue)
    await rec.add("a0", "a")
    await rec.add("a1", "a")
    await rec.add("b0", "b")
    rec.tasks["a1"].cancel()
    await _settle()
    assert queue.waiting() == 1 and queue.waiting("a") == 0
    await rec.serve(1)
    assert rec.order == ["a0", "b0"] and queue.in_flight == 1


async def test_cancel_after_the_slot_was_granted_gives_it_back():
    queue = FairQueue(capacity=1, max_waiting=10)
    await queue.acquire("a")
    waiter = asyncio.create_task(queue.acquire("b"))
    await _settle()
    queue.release()  # the slot goes to b's future ...
    waiter.cancel()  # ... but b is cancelled before it runs again
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert queue.in_flight == 0 and queue.waiting() == 0
    assert await queue.acquire("c") == 0.0


async def test_timeout_leaves_the_queue():
    queue = FairQueue(capacity=1, max_waiting=10)
    await queue.acquire("a")
    with pytest.raises(QueueTimeout):
        await queue.acquire("b", timeout=0.05)
    assert queue.waiting() == 0 and queue.in_flight == 1


async def test_full_queue_refuses_only_the_longest_queue():
    queue = FairQueue(capacity=1, max_waiting=3)
    rec = Recorder(queue)
    await rec.add("a0", "a")
    for i in range(1, 4):
        await rec.add(f"a{i}", "a")
    assert queue.waiting() == 3
    # The flooder's next request is refused ...
    with pytest.raises(QueueFull):
        await queue.acquire("a")
    # ... while another tenant's request pushes out the flooder's last waiter.
    await rec.add("b0", "b")
    with pytest.raises(QueueFull):
        await rec.tasks["a3"]
    assert queue.waiting("a") == 2 and queue.waiting("b") == 1
    await rec.serve(3)
    assert rec.order == ["a0", "b0", "a1", "a2"]


async def test_full_queue_without_fairness_refuses_the_newcomer():
    queue = FairQueue(capacity=1, max_waiting=2, fair=False)
    rec = Recorder(queue)
    for i in range(3):
        await rec.add(f"a{i}", "a")
    with pytest.raises(QueueFull):
        await queue.acquire("b")
    assert queue.waiting("a") == 2


async def test_no_queue_at_all():
    queue = FairQueue(capacity=1, max_waiting=0)
    await queue.acquire("a")
    with pytest.raises(QueueFull):
        await queue.acquire("b")

"""Registry lookups cached for the request path (key -> tenant, (tenant, model) -> adapter).

Each lookup runs in a worker thread on a miss, never on the event loop. Entries live `ttl`
seconds (the bound on how stale another replica's write can be here) and the whole cache is
dropped as soon as this process writes to the registry (its `generation` changes). At most
`maxsize` entries (cachetools evicts the oldest), so a flood of made-up keys cannot grow memory;
"not found" is cached too."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

import anyio.to_thread
from cachetools import TTLCache

from adapters.registry import Registry

V = TypeVar("V")


class LookupCache(Generic[V]):
    def __init__(self, registry: Registry, ttl: float, maxsize: int = 10_000) -> None:
        self.registry = registry
        self._entries: TTLCache[Hashable, V] = TTLCache(maxsize=maxsize, ttl=ttl)
        self._generation = registry.generation

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    async def get(self, key: Hashable, load: Callable[[], V]) -> V:
        """The cached value for `key`, or `load()` run in a worker thread and cached."""
        if self.registry.generation != self._generation:
            self._entries.clear()
            self._generation = self.registry.generation
        try:
            return self._entries[key]
        except KeyError:
            pass
        value = await anyio.to_thread.run_sync(load)
        self._entries[key] = value
        return value

"""The usage ledger: requests and tokens per tenant, adapter version and UTC day, kept in the
registry database so they survive restarts.

`record` only adds to an in-memory buffer (a lock held for a dict update), so the event loop never
waits on the database; a background thread writes the buffer every `interval` seconds in one
transaction (`flush`), and `close` writes what is left. A failed write keeps the counts for the
next try; counts recorded in the last `interval` before a crash (not a clean stop) are lost.

Wiring: `ledger = UsageLedger(registry, interval)`, `ledger.start()` at start-up,
`ledger.record(...)` at the end of each request, `ledger.close()` at shutdown."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import UTC, date, datetime

from adapters.registry import Registry

log = logging.getLogger(__name__)

_Key = tuple[int, int | None, date]  # tenant id, adapter version id (None: base model), day


def utc_today() -> date:
    return datetime.now(UTC).date()


class UsageLedger:
    def __init__(
        self,
        registry: Registry,
        interval: float = 5.0,
        *,
        today: Callable[[], date] = utc_today,
    ) -> None:
        self.registry = registry
        self.interval = interval
        self._today = today
        self._buffer: dict[_Key, list[int]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def record(
        self,
        tenant_id: int,
        adapter_version_id: int | None,
        prompt_tokens: int,
        completion_tokens: int,
    ) -> None:
        """Count one request. Never touches the database."""
        key = (tenant_id, adapter_version_id, self._today())
        with self._lock:
            counts = self._buffer.setdefault(key, [0, 0, 0])
            counts[0] += 1
            counts[1] += prompt_tokens
            counts[2] += completion_tokens

    def pending(self) -> int:
        """Rows waiting to be written."""
        with self._lock:
            return len(self._buffer)

    def flush(self) -> None:
        """Write the buffered counts in one transaction. On failure they go back to the buffer
        (added to anything recorded meanwhile) and the error is raised."""
        with self._lock:
            batch, self._buffer = self._buffer, {}
        if not batch:
            return
        try:
            self.registry.add_usage({k: (v[0], v[1], v[2]) for k, v in batch.items()})
        except BaseException:
            with self._lock:
                for key, (requests, prompt, completion) in batch.items():
                    counts = self._buffer.setdefault(key, [0, 0, 0])
                    counts[0] += requests
                    counts[1] += prompt
                    counts[2] += completion
            raise

    def start(self) -> None:
        """Flush every `interval` seconds in a daemon thread until `close`."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="usage-ledger", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the background thread and write what is left."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._flush_logged()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._flush_logged()

    def _flush_logged(self) -> None:
        try:
            self.flush()
        except Exception:  # noqa: BLE001 - the counts stay buffered for the next try
            log.exception("writing %d usage rows failed; will retry", self.pending())

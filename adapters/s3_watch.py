"""Watched S3 prefixes: new folders become new adapter versions (as NIM's source directory).

Each `s3_watch` entry `TENANT=s3://bucket/prefix/` watches `prefix/<adapter-name>/<folder>/`:
when the newest `<folder>` of an adapter (by name order: v001, v002... or timestamps) is not
the one its live version came from, that folder is registered as the tenant's next version of
`<adapter-name>` through the one pipeline (`adapters.sources.register_from`: same size cap, file
rules, validation, quota and atomicity as an upload). What was registered is known from the
registry (a version's source is its folder's URI), so a restart registers nothing twice; a
folder that failed is retried only after a restart (its error is logged). Deleting a version
without deleting its folder brings the folder back as a new version on the next poll.

The watcher is a daemon thread polling every `s3_watch_seconds` (boto3 blocks)."""

from __future__ import annotations

import dataclasses
import logging
import threading
from dataclasses import dataclass

from adapters.errors import AdapterError
from adapters.names import is_valid_name
from adapters.s3 import S3Config, S3Source, parse_s3_uri, translate_error
from adapters.service import AdapterService
from adapters.sources import register_from

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WatchedPrefix:
    tenant: str
    bucket: str
    prefix: str

    @classmethod
    def parse(cls, spec: str) -> WatchedPrefix:
        """`TENANT=s3://bucket/prefix/`."""
        tenant, sep, uri = spec.partition("=")
        if not sep or not is_valid_name(tenant):
            raise ValueError(f"s3_watch expects TENANT=s3://bucket/prefix/, got {spec!r}")
        bucket, prefix = parse_s3_uri(uri)
        return cls(tenant, bucket, prefix)


class S3Watcher:
    """Polls the watched prefixes and registers new folders."""

    def __init__(
        self,
        service: AdapterService,
        config: S3Config,
        watched: list[WatchedPrefix],
        interval: float,
    ) -> None:
        self.service = service
        self.config = config
        self.watched = watched
        self.interval = interval
        self._failed: set[str] = set()  # folder URIs whose registration failed in this process
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> S3Watcher:
        self._thread = threading.Thread(target=self._run, name="s3-watch", daemon=True)
        self._thread.start()
        log.info("watching %d S3 prefixes every %g s", len(self.watched), self.interval)
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.poll()
            self._stop.wait(self.interval)

    def poll(self) -> int:
        """One pass over every watched prefix; return how many versions it registered."""
        registered = 0
        for watch in self.watched:
            try:
                registered += self._poll_one(watch)
            except Exception as exc:  # noqa: BLE001 - a background loop: log and go on
                if hasattr(exc, "response"):
                    exc = translate_error(exc, f"s3://{watch.bucket}/{watch.prefix}")
                log.warning("S3 watch of s3://%s/%s: %s", watch.bucket, watch.prefix, exc)
        return registered

    def _poll_one(self, watch: WatchedPrefix) -> int:
        tenant = self.service.registry.tenant_by_name(watch.tenant)
        if tenant is None:
            log.debug("S3 watch: tenant %r does not exist (yet)", watch.tenant)
            return 0
        client = self.config.client()
        registered = 0
        for adapter_prefix in _folders(client, watch.bucket, watch.prefix):
            name = adapter_prefix[len(watch.prefix) :].rstrip("/")
            versions = _folders(client, watch.bucket, adapter_prefix)
            if not is_valid_name(name) or not versions:
                continue
            uri = f"s3://{watch.bucket}/{max(versions)}"
            live = self.service.registry.find_live(tenant, name)
            if uri in self._failed or (live is not None and live.source == uri):
                continue
            source = S3Source(
                watch.bucket,
                max(versions),
                dataclasses.replace(self.config, allowed_prefixes=(uri,)),
                tenant.name,
                client=client,
            )
            try:
                version = register_from(self.service, tenant, name, source)
            except AdapterError as exc:
                self._failed.add(uri)
                log.warning("S3 watch: %s not registered (%s): %s", uri, exc.code, exc)
                continue
            log.info("S3 watch: %s registered as %s", uri, version.engine_name)
            registered += 1
        return registered


def _folders(client, bucket: str, prefix: str) -> list[str]:
    """The sub-folder prefixes directly under `prefix`."""
    pages = client.get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix=prefix, Delimiter="/"
    )
    return [p["Prefix"] for page in pages for p in page.get("CommonPrefixes", [])]


def start_s3_watch(settings, service: AdapterService) -> S3Watcher | None:
    """Start the watcher the settings ask for (`s3_watch`), or None."""
    if not settings.s3_watch:
        return None
    watched = [WatchedPrefix.parse(spec) for spec in settings.s3_watch]
    return S3Watcher(
        service, S3Config.from_settings(settings), watched, settings.s3_watch_seconds
    ).start()

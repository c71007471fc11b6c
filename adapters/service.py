"""Adapter registration: validation, store and registry together.

Order of a registration: unpack into staging -> validate against the base model and rewrite the
config from the validated fields -> pin the digest in the registry -> move into the
content-addressed store -> insert the registry row and end the pin in one transaction (quota
checked there too). A failure at any step ends the pin; the stored folder is removed only under
the registry's per-digest lock and only when no live row and no other pin uses it, so a failed
registration or a purge never removes files another tenant's version uses."""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from adapters.archive import copy_adapter_folder, extract_archive
from adapters.errors import QuotaExceeded
from adapters.names import check_adapter_name
from adapters.registry import AdapterVersion, Registry, Tenant, split_pinned
from adapters.store import STALE_STAGING_SECONDS, AdapterStore
from adapters.validation import BaseModelSpec, validate_adapter, write_config

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Reconciliation:
    """What the start-up reconciliation of store and registry did."""

    orphans_removed: int
    staging_removed: int
    stale_pins: int
    missing: tuple[str, ...]  # engine names of live versions whose files are gone


class AdapterService:
    """The write path: registration and deletion. Lookups are `adapters.catalog.AdapterCatalog`."""

    def __init__(
        self,
        registry: Registry,
        store: AdapterStore,
        base: BaseModelSpec,
        *,
        max_rank: int,
        max_bytes: int,
    ) -> None:
        self.registry = registry
        self.store = store
        self.base = base
        self.max_rank = max_rank
        self.max_bytes = max_bytes
        self.public = registry.ensure_public_tenant()

    def check_room(self, tenant: Tenant) -> None:
        """Refuse an upload before its body is read when the tenant is already at a quota
        (the exact check, with the adapter's size, runs again when the row is inserted)."""
        count, used = self.registry.stored_usage(tenant)
        if count >= tenant.max_adapters:
            raise QuotaExceeded(
                f"tenant {tenant.name!r} already has {count} adapter versions "
                f"(quota {tenant.max_adapters})"
            )
        if used >= tenant.max_bytes:
            raise QuotaExceeded(
                f"tenant {tenant.name!r} already uses {used} bytes (quota {tenant.max_bytes})"
            )

    def register_archive(
        self, tenant: Tenant, name: str, archive: Path | BinaryIO
    ) -> AdapterVersion:
        check_adapter_name(name)
        staged = self.store.new_staging_dir()
        try:
            extract_archive(archive, staged, self.max_bytes)
            return self._register_staged(tenant, name, staged, source="upload")
        finally:
            shutil.rmtree(staged, ignore_errors=True)

    def register_folder(
        self,
        tenant: Tenant,
        name: str,
        folder: Path,
        source: str = "folder",
        *,
        links_within: Path | None = None,
    ) -> AdapterVersion:
        """Register a server-side PEFT folder. `source` is what responses show (`folder`, or
        `hub:<id>`); the folder's path goes to the server log only."""
        check_adapter_name(name)
        staged = self.store.new_staging_dir()
        try:
            copy_adapter_folder(Path(folder), staged, self.max_bytes, links_within=links_within)
            version = self._register_staged(tenant, name, staged, source=source)
        finally:
            shutil.rmtree(staged, ignore_errors=True)
        log.info("adapter %s registered from %s", version.engine_name, folder)
        return version

    def ensure_static(self, name: str, folder: Path) -> AdapterVersion:
        """Register a start-up `--lora NAME=PATH` under the public tenant, once per content."""
        check_adapter_name(name)
        staged = self.store.new_staging_dir()
        try:
            copy_adapter_folder(Path(folder), staged, self.max_bytes)
            info = validate_adapter(staged, self.base, self.max_rank)
            write_config(staged, info)
            current = self.registry.find_live(self.public, name)
            if current is not None and current.digest == self.store.digest(staged):
                return current
            version = self._register_staged(self.public, name, staged, source="static")
        finally:
            shutil.rmtree(staged, ignore_errors=True)
        log.info("static adapter %s registered from %s", version.engine_name, folder)
        return version

    def _register_staged(
        self, tenant: Tenant, name: str, staged: Path, source: str
    ) -> AdapterVersion:
        info = validate_adapter(staged, self.base, self.max_rank)
        write_config(staged, info)
        digest = self.store.digest(staged)
        pin = self.registry.pin_digest(digest)
        try:
            path, size = self.store.commit(staged, digest)
            return self.registry.add_version(
                tenant,
                name,
                digest=digest,
                path=path,
                size_bytes=size,
                rank=info.rank,
                alpha=info.alpha,
                target_modules=info.target_modules,
                base_model=self.base.name,
                source=source,
                pin=pin,
                # The operator's --lora list is configuration, not a tenant's upload.
                enforce_quota=source != "static",
            )
        except BaseException:
            self.registry.release_digest(digest, self.store.remove, pin=pin)
            raise

    def delete(self, tenant: Tenant, model: str) -> list[AdapterVersion]:
        name, version = split_pinned(model)
        return self.registry.delete(tenant, name, version)

    def purge_files(self, versions: list[AdapterVersion]) -> None:
        """Remove stored files no live version and no registration in progress uses."""
        for digest in dict.fromkeys(v.digest for v in versions):
            self.registry.release_digest(digest, self.store.remove)

    def reconcile(self) -> Reconciliation:
        """At start-up: remove store folders no live version uses (purges a shutdown cut off),
        stale staging leftovers and pins of interrupted registrations; log live versions whose
        files are missing (they are kept: nothing stored is dropped from the registry)."""
        staging = self.store.clean_staging(STALE_STAGING_SECONDS)
        pins = self.registry.drop_stale_pins(time.time() - STALE_STAGING_SECONDS)
        orphans = sum(
            self.registry.release_digest(d, self.store.remove) for d in list(self.store.digests())
        )
        missing = tuple(
            v.engine_name
            for v in self.registry.live_versions()
            if not self.store.holds(Path(v.path))
        )
        result = Reconciliation(orphans, staging, pins, missing)
        log.info(
            "adapter store reconciled: %d orphan folders, %d staging leftovers and %d stale pins "
            "removed",
            orphans,
            staging,
            pins,
        )
        if missing:
            log.error(
                "%d live adapter versions have no files in the store (requests to them fail): %s",
                len(missing),
                ", ".join(missing),
            )
        return result

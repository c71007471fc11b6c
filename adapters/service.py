"""Adapter registration and lookup: validation, store and registry together.

Order of a registration: unpack into staging -> validate against the base model -> move into
the content-addressed store -> insert the registry row (quota checked in the same transaction).
A failure at any step leaves the registry and the stored adapters as they were."""

from __future__ import annotations

import shutil
from pathlib import Path

from adapters.archive import copy_adapter_folder, extract_archive
from adapters.names import check_adapter_name
from adapters.registry import AdapterVersion, Registry, Tenant, split_pinned
from adapters.store import AdapterStore
from adapters.validation import BaseModelSpec, validate_adapter


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

    def register_archive(self, tenant: Tenant, name: str, archive: Path) -> AdapterVersion:
        check_adapter_name(name)
        staged = self.store.new_staging_dir()
        try:
            extract_archive(archive, staged, self.max_bytes)
            return self._register_staged(tenant, name, staged, source="upload")
        finally:
            shutil.rmtree(staged, ignore_errors=True)

    def register_folder(
        self, tenant: Tenant, name: str, folder: Path, source: str | None = None
    ) -> AdapterVersion:
        check_adapter_name(name)
        staged = self.store.new_staging_dir()
        try:
            copy_adapter_folder(Path(folder), staged, self.max_bytes)
            return self._register_staged(tenant, name, staged, source=source or f"folder:{folder}")
        finally:
            shutil.rmtree(staged, ignore_errors=True)

    def ensure_static(self, name: str, folder: Path) -> AdapterVersion:
        """Register a start-up `--lora NAME=PATH` under the public tenant, once per content."""
        check_adapter_name(name)
        staged = self.store.new_staging_dir()
        try:
            copy_adapter_folder(Path(folder), staged, self.max_bytes)
            digest = self.store.digest(staged)
            current = self.registry.find_live(self.public, name)
            if current is not None and current.digest == digest:
                return current
            return self._register_staged(self.public, name, staged, source=f"static:{folder}")
        finally:
            shutil.rmtree(staged, ignore_errors=True)

    def _register_staged(
        self, tenant: Tenant, name: str, staged: Path, source: str
    ) -> AdapterVersion:
        info = validate_adapter(staged, self.base, self.max_rank)
        digest, path, size = self.store.commit(staged)
        try:
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
            )
        except Exception:
            if not self.registry.digest_in_use(digest):
                self.store.remove(digest)
            raise

    def delete(self, tenant: Tenant, model: str) -> list[AdapterVersion]:
        name, version = split_pinned(model)
        return self.registry.delete(tenant, name, version)

    def purge_files(self, versions: list[AdapterVersion]) -> None:
        """Remove stored files no live version refers to any more."""
        for v in versions:
            if not self.registry.digest_in_use(v.digest):
                self.store.remove(v.digest)

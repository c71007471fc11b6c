"""The registry: tenants, API-key hashes and adapter versions, in SQLite.

Every adapter version has a row id that never changes and is never reused: it is the stable
integer id vLLM's `LoRARequest` needs, across restarts. Adapters of the built-in `public` tenant
(the server's static `--lora` adapters) are visible to every tenant; a tenant's own adapter of the
same name takes precedence."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from adapters.errors import Conflict, NotFound, QuotaExceeded
from adapters.keys import hash_key, new_api_key

PUBLIC_TENANT = "public"

SCHEMA = """
CREATE TABLE IF NOT EXISTS tenants (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    key_hash TEXT NOT NULL UNIQUE,
    max_adapters INTEGER NOT NULL,
    max_bytes INTEGER NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS adapter_versions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant_id INTEGER NOT NULL REFERENCES tenants(id),
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    digest TEXT NOT NULL,
    path TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    rank INTEGER NOT NULL,
    alpha REAL NOT NULL,
    target_modules TEXT NOT NULL,
    base_model TEXT NOT NULL,
    source TEXT NOT NULL,
    created_at REAL NOT NULL,
    deleted_at REAL,
    UNIQUE (tenant_id, name, version)
);
CREATE INDEX IF NOT EXISTS adapter_versions_lookup ON adapter_versions (tenant_id, name, deleted_at);
"""


@dataclass(frozen=True)
class Tenant:
    id: int
    name: str
    max_adapters: int
    max_bytes: int
    created_at: float

    @property
    def is_public(self) -> bool:
        return self.name == PUBLIC_TENANT


@dataclass(frozen=True)
class AdapterVersion:
    id: int
    tenant_id: int
    tenant_name: str
    name: str
    version: int
    digest: str
    path: str
    size_bytes: int
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    base_model: str
    source: str
    created_at: float
    deleted_at: float | None

    @property
    def engine_name(self) -> str:
        """The name vLLM sees: unique across tenants and versions."""
        return f"{self.tenant_name}/{self.name}@{self.version}"

    @property
    def pinned_name(self) -> str:
        return f"{self.name}@{self.version}"

    def public_dict(self) -> dict:
        return {
            "id": self.pinned_name,
            "object": "adapter",
            "name": self.name,
            "version": self.version,
            "owner": self.tenant_name,
            "sha256": self.digest,
            "size_bytes": self.size_bytes,
            "rank": self.rank,
            "lora_alpha": self.alpha,
            "target_modules": list(self.target_modules),
            "base_model": self.base_model,
            "source": self.source,
            "created": int(self.created_at),
        }


def split_pinned(model: str) -> tuple[str, int | None]:
    """`name@3` -> ("name", 3); `name` -> ("name", None)."""
    name, sep, version = model.rpartition("@")
    if sep and name and version.isdigit():
        return name, int(version)
    return model, None


class Registry:
    def __init__(self, url_or_path: str | Path) -> None:
        path = str(url_or_path)
        if path.startswith("sqlite:///"):
            path = path[len("sqlite:///") :]
        elif "://" in path:
            raise ValueError(f"unsupported registry database URL {path!r}")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._conn.row_factory = sqlite3.Row
        self._lock = threading.RLock()
        with self._lock:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            self._conn.executescript(SCHEMA)

    def close(self) -> None:
        self._conn.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def _query(self, sql: str, params: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    # ---- tenants -------------------------------------------------------------------------------

    def create_tenant(self, name: str, max_adapters: int, max_bytes: int) -> tuple[Tenant, str]:
        """Create a tenant; return it with its API key (the only time the key exists in clear)."""
        key = new_api_key()
        with self._tx() as conn:
            if conn.execute("SELECT 1 FROM tenants WHERE name = ?", (name,)).fetchone():
                raise Conflict(f"tenant {name!r} already exists")
            cur = conn.execute(
                "INSERT INTO tenants (name, key_hash, max_adapters, max_bytes, created_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (name, hash_key(key), max_adapters, max_bytes, time.time()),
            )
            tenant_id = cur.lastrowid
        tenant = self.get_tenant(tenant_id)
        return tenant, key

    def ensure_public_tenant(self) -> Tenant:
        rows = self._query("SELECT * FROM tenants WHERE name = ?", (PUBLIC_TENANT,))
        if rows:
            return _tenant(rows[0])
        # Nobody holds the public tenant's key: it owns the static adapters only.
        tenant, _ = self.create_tenant(PUBLIC_TENANT, max_adapters=1_000_000, max_bytes=1 << 50)
        return tenant

    def get_tenant(self, tenant_id: int) -> Tenant:
        rows = self._query("SELECT * FROM tenants WHERE id = ?", (tenant_id,))
        if not rows:
            raise NotFound(f"tenant {tenant_id} does not exist")
        return _tenant(rows[0])

    def tenant_by_key(self, key: str) -> Tenant | None:
        rows = self._query("SELECT * FROM tenants WHERE key_hash = ?", (hash_key(key),))
        if not rows or rows[0]["name"] == PUBLIC_TENANT:
            return None
        return _tenant(rows[0])

    def list_tenants(self) -> list[Tenant]:
        return [_tenant(r) for r in self._query("SELECT * FROM tenants ORDER BY id")]

    # ---- adapters ------------------------------------------------------------------------------

    def add_version(
        self,
        tenant: Tenant,
        name: str,
        *,
        digest: str,
        path: Path,
        size_bytes: int,
        rank: int,
        alpha: float,
        target_modules: tuple[str, ...],
        base_model: str,
        source: str,
    ) -> AdapterVersion:
        """Record a new version of `name` for `tenant`, enforcing the tenant's quotas."""
        with self._tx() as conn:
            count, used = conn.execute(
                "SELECT COUNT(*), COALESCE(SUM(size_bytes), 0) FROM adapter_versions "
                "WHERE tenant_id = ? AND deleted_at IS NULL",
                (tenant.id,),
            ).fetchone()
            if count + 1 > tenant.max_adapters:
                raise QuotaExceeded(
                    f"tenant {tenant.name!r} already has {count} adapter versions "
                    f"(quota {tenant.max_adapters})"
                )
            if used + size_bytes > tenant.max_bytes:
                raise QuotaExceeded(
                    f"tenant {tenant.name!r} would use {used + size_bytes} bytes "
                    f"(quota {tenant.max_bytes})"
                )
            (latest,) = conn.execute(
                "SELECT COALESCE(MAX(version), 0) FROM adapter_versions "
                "WHERE tenant_id = ? AND name = ?",
                (tenant.id, name),
            ).fetchone()
            cur = conn.execute(
                "INSERT INTO adapter_versions (tenant_id, name, version, digest, path, size_bytes, "
                "rank, alpha, target_modules, base_model, source, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    tenant.id,
                    name,
                    latest + 1,
                    digest,
                    str(path),
                    size_bytes,
                    rank,
                    alpha,
                    json.dumps(list(target_modules)),
                    base_model,
                    source,
                    time.time(),
                ),
            )
            version_id = cur.lastrowid
        return self.get_version(version_id)

    def get_version(self, version_id: int) -> AdapterVersion:
        rows = self._query(_SELECT_VERSIONS + " WHERE v.id = ?", (version_id,))
        if not rows:
            raise NotFound(f"adapter version {version_id} does not exist")
        return _version(rows[0])

    def find_live(
        self, tenant: Tenant, name: str, version: int | None = None
    ) -> AdapterVersion | None:
        """The tenant's live version (latest, or pinned) of `name`, or None."""
        sql = _SELECT_VERSIONS + " WHERE v.tenant_id = ? AND v.name = ? AND v.deleted_at IS NULL"
        params: tuple = (tenant.id, name)
        if version is not None:
            sql += " AND v.version = ?"
            params += (version,)
        rows = self._query(sql + " ORDER BY v.version DESC LIMIT 1", params)
        return _version(rows[0]) if rows else None

    def list_live(self, tenant: Tenant) -> list[AdapterVersion]:
        rows = self._query(
            _SELECT_VERSIONS + " WHERE v.tenant_id = ? AND v.deleted_at IS NULL "
            "ORDER BY v.name, v.version",
            (tenant.id,),
        )
        return [_version(r) for r in rows]

    def delete(self, tenant: Tenant, name: str, version: int | None = None) -> list[AdapterVersion]:
        """Mark the live versions (all, or one) of `name` deleted; return them."""
        with self._tx() as conn:
            sql = "SELECT id FROM adapter_versions WHERE tenant_id = ? AND name = ? AND deleted_at IS NULL"
            params: tuple = (tenant.id, name)
            if version is not None:
                sql += " AND version = ?"
                params += (version,)
            ids = [r["id"] for r in conn.execute(sql, params).fetchall()]
            if not ids:
                raise NotFound(f"adapter {name!r} does not exist")
            now = time.time()
            conn.executemany(
                "UPDATE adapter_versions SET deleted_at = ? WHERE id = ?", [(now, i) for i in ids]
            )
        return [self.get_version(i) for i in ids]

    def digest_in_use(self, digest: str) -> bool:
        rows = self._query(
            "SELECT 1 FROM adapter_versions WHERE digest = ? AND deleted_at IS NULL LIMIT 1",
            (digest,),
        )
        return bool(rows)


_SELECT_VERSIONS = (
    "SELECT v.*, t.name AS tenant_name FROM adapter_versions v JOIN tenants t ON t.id = v.tenant_id"
)


def _tenant(row: sqlite3.Row) -> Tenant:
    return Tenant(
        id=row["id"],
        name=row["name"],
        max_adapters=row["max_adapters"],
        max_bytes=row["max_bytes"],
        created_at=row["created_at"],
    )


def _version(row: sqlite3.Row) -> AdapterVersion:
    return AdapterVersion(
        id=row["id"],
        tenant_id=row["tenant_id"],
        tenant_name=row["tenant_name"],
        name=row["name"],
        version=row["version"],
        digest=row["digest"],
        path=row["path"],
        size_bytes=row["size_bytes"],
        rank=row["rank"],
        alpha=row["alpha"],
        target_modules=tuple(json.loads(row["target_modules"])),
        base_model=row["base_model"],
        source=row["source"],
        created_at=row["created_at"],
        deleted_at=row["deleted_at"],
    )

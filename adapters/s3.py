"""Adapters from S3-compatible object storage: `s3://bucket/prefix` as an `AdapterSource`.

Who may fetch what: the endpoint and credentials come only from the server's settings (a
tenant can never point the server at another address); tenants name a bucket and prefix, and
only ones inside `s3_allowed_prefixes` (where `{tenant}` stands for the caller's tenant name,
so `s3://adapters/{tenant}/` gives each tenant its own folder). The prefix is a folder: it may
hold adapter_config.json and adapter_model.safetensors (README.md and the other files an
archive may carry are skipped), nothing else and no sub-folders, at most `max_bytes` in all,
counted again while downloading. Errors name the bucket and prefix the caller sent, never the
endpoint or a credential.

boto3 is an optional dependency (the `s3` extra); its calls block, so callers run `fetch` in a
worker thread (the routes do)."""

from __future__ import annotations

import functools
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from adapters.archive import IGNORED_FILES, MAX_MEMBERS, PICKLE_SUFFIXES, REQUIRED_FILES
from adapters.errors import (
    AdapterError,
    AdapterTooLarge,
    InvalidAdapter,
    NotFound,
    SourceNotAllowed,
)

log = logging.getLogger(__name__)

_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]\Z")
_PREFIX_PART = re.compile(r"[A-Za-z0-9!_.*'()@=+,-]{1,255}\Z")
MAX_PREFIX_CHARS = 512
_CHUNK = 1 << 20
_ACCESS_DENIED = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AllAccessDisabled",
    "AuthorizationHeaderMalformed",
    "InvalidToken",
    "ExpiredToken",
    "403",
}
_NOT_FOUND = {"NoSuchBucket", "NoSuchKey", "404", "NotFound"}


class SourceAccessDenied(SourceNotAllowed):
    """The storage refused the server's credentials for this bucket or prefix (403)."""

    code = "source_access_denied"


@dataclass(frozen=True)
class S3Config:
    """The server's S3 settings (never shown in a response or a log line)."""

    endpoint_url: str | None = field(default=None, repr=False)
    region: str | None = None
    access_key_id: SecretStr | None = field(default=None, repr=False)
    secret_access_key: SecretStr | None = field(default=None, repr=False)
    allowed_prefixes: tuple[str, ...] = ()
    timeout: float = 300.0

    @classmethod
    def from_settings(cls, settings: Any) -> S3Config | None:
        """The `s3_*` settings; None when S3 sources are off (no allowed prefix, no watch)."""
        if not (settings.s3_allowed_prefixes or settings.s3_watch):
            return None
        return cls(
            endpoint_url=settings.s3_endpoint_url,
            region=settings.s3_region,
            access_key_id=settings.s3_access_key_id,
            secret_access_key=settings.s3_secret_access_key,
            allowed_prefixes=tuple(settings.s3_allowed_prefixes),
            timeout=settings.s3_timeout_seconds,
        )

    def client(self) -> Any:
        """A boto3 client for these settings, made once and shared (boto3 clients are
        thread-safe; making one costs ~100 ms of CPU that would stall the event loop)."""
        secret = self.secret_access_key
        return _client(
            self.endpoint_url,
            self.region,
            self.access_key_id.get_secret_value() if self.access_key_id else None,
            secret.get_secret_value() if secret else None,
            self.timeout,
        )

    def allows(self, uri: str, tenant_name: str) -> bool:
        """Whether `uri` (a folder URI ending in /) lies under an allowed prefix."""
        for rule in self.allowed_prefixes:
            allowed = rule.replace("{tenant}", tenant_name)
            if uri.startswith(allowed if allowed.endswith("/") else allowed + "/"):
                return True
        return False


@functools.lru_cache(maxsize=8)
def _client(
    endpoint_url: str | None,
    region: str | None,
    access_key_id: str | None,
    secret_access_key: str | None,
    timeout: float,
) -> Any:
    try:
        import boto3
        from botocore.config import Config
    except ImportError as exc:
        raise SourceNotAllowed(
            "S3 sources need boto3 on the server (pip install 'tenantlora[s3]')"
        ) from exc
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint_url,
        region_name=region,
        aws_access_key_id=access_key_id,
        aws_secret_access_key=secret_access_key,
        config=Config(
            connect_timeout=min(timeout, 10),
            read_timeout=min(timeout, 60),
            retries={"max_attempts": 2},
            signature_version="s3v4",
            s3={"addressing_style": "path"},
        ),
    )


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """(bucket, prefix) of `s3://bucket/prefix`; the prefix ends in `/` and is a plain path."""
    if not uri.startswith("s3://"):
        raise InvalidAdapter("an S3 source must look like s3://bucket/prefix", "invalid_uri")
    bucket, _, prefix = uri[len("s3://") :].partition("/")
    if not _BUCKET.match(bucket) or ".." in bucket:
        raise InvalidAdapter(f"`{bucket[:80]}` is not a valid S3 bucket name", "invalid_uri")
    parts = [p for p in prefix.split("/") if p]
    if (
        not parts
        or len(prefix) > MAX_PREFIX_CHARS
        or "//" in prefix.rstrip("/")
        or prefix.startswith("/")
        or any(p in (".", "..") or not _PREFIX_PART.match(p) for p in parts)
    ):
        raise InvalidAdapter(
            "an S3 source must name a folder: s3://bucket/prefix (letters, digits and -_.!*'()"
            "@=+, in each part, no `..`)",
            "invalid_uri",
        )
    return bucket, "/".join(parts) + "/"


def translate_error(exc: Exception, where: str) -> AdapterError:
    """A storage error as the caller's error, naming only `where` (the caller's own URI)."""
    code = ""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        error = response.get("Error") or {}
        code = str(error.get("Code") or response.get("ResponseMetadata", {}).get("HTTPStatusCode"))
    log.warning("S3 access to %s failed: %s %s", where, type(exc).__name__, code)
    if code in _ACCESS_DENIED:
        return SourceAccessDenied(
            f"the object storage refused access to {where} (check the bucket's permissions "
            "for the server's credentials)"
        )
    if code in _NOT_FOUND:
        return NotFound(f"{where} does not exist", "source_not_found")
    return InvalidAdapter(
        f"could not fetch {where} from the object storage ({type(exc).__name__})",
        "source_fetch_failed",
    )


def _storage_errors() -> tuple[type[Exception], ...]:
    from botocore.exceptions import BotoCoreError, ClientError

    return (BotoCoreError, ClientError)


@dataclass
class S3Source:
    """The adapter files under `s3://bucket/prefix/`."""

    bucket: str
    prefix: str
    config: S3Config = field(repr=False)
    tenant_name: str = ""
    admin_only: bool = False
    client: Any = field(default=None, repr=False)

    @property
    def label(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def fetch(self, into: Path, max_bytes: int) -> None:
        if not self.config.allows(self.label, self.tenant_name):
            log.warning("refused S3 source outside s3_allowed_prefixes: %s", self.label)
            raise SourceNotAllowed(f"{self.label} is not inside a prefix this server allows")
        client = self.client or self.config.client()
        deadline = time.monotonic() + self.config.timeout
        try:
            sizes = self._list(client, max_bytes)
            into.mkdir(parents=True, exist_ok=False)
            for name in sorted(REQUIRED_FILES):
                self._download(client, name, sizes[name], into / name, max_bytes, deadline)
        except _storage_errors() as exc:
            raise translate_error(exc, self.label) from exc

    def _list(self, client: Any, max_bytes: int) -> dict[str, int]:
        """The prefix's files and sizes, checked like an archive's members."""
        sizes: dict[str, int] = {}
        total = count = 0
        pages = client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.prefix, PaginationConfig={"PageSize": MAX_MEMBERS}
        )
        for page in pages:
            for obj in page.get("Contents", []):
                count += 1
                if count > MAX_MEMBERS:
                    raise InvalidAdapter(
                        f"{self.label} holds more than {MAX_MEMBERS} objects", "invalid_archive"
                    )
                name, size = obj["Key"][len(self.prefix) :], int(obj.get("Size", 0))
                if not name or (name.endswith("/") and size == 0):
                    continue  # a folder marker
                total += size
                if total > max_bytes:
                    raise AdapterTooLarge(
                        f"{self.label} holds more than the limit of {max_bytes} bytes"
                    )
                sizes[_member_name(name)] = size
        if count == 0:
            raise NotFound(f"{self.label} holds no objects", "source_not_found")
        missing = REQUIRED_FILES - sizes.keys()
        if missing:
            raise InvalidAdapter(f"{self.label} lacks {', '.join(sorted(missing))}", "missing_file")
        return sizes

    def _download(
        self, client: Any, name: str, size: int, dest: Path, max_bytes: int, deadline: float
    ) -> None:
        body = client.get_object(Bucket=self.bucket, Key=self.prefix + name)["Body"]
        received = 0
        try:
            with dest.open("wb") as out:
                while chunk := body.read(_CHUNK):
                    received += len(chunk)
                    if received > min(size, max_bytes):  # changed since it was listed
                        raise InvalidAdapter(
                            f"{name} under {self.label} grew while it was downloaded",
                            "source_fetch_failed",
                        )
                    if time.monotonic() > deadline:
                        raise InvalidAdapter(
                            f"fetching {self.label} took over {self.config.timeout:g} s",
                            "source_fetch_failed",
                        )
                    out.write(chunk)
        finally:
            body.close()
        if received != size:
            raise InvalidAdapter(
                f"{name} under {self.label} changed while it was downloaded", "source_fetch_failed"
            )


def _member_name(name: str) -> str:
    """Check one object name under the prefix as an archive member's (adapters.archive)."""
    if "/" in name:
        raise InvalidAdapter(
            f"unexpected sub-folder {name.split('/')[0]!r} under the prefix (an adapter is the "
            "two files directly under it)",
            "unexpected_file",
        )
    if name.endswith(PICKLE_SUFFIXES):
        raise InvalidAdapter(
            f"{name} is a pickle file; only safetensors weights are accepted "
            "(save with safe_serialization=True)",
            "pickle_weights_refused",
        )
    if name not in REQUIRED_FILES | IGNORED_FILES:
        raise InvalidAdapter(f"unexpected file {name!r} under the prefix", "unexpected_file")
    return name

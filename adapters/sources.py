"""Where adapters come from, behind one small interface (as LoRAX's `sources/`).

A source fills a new staging folder with an adapter's two files (`AdapterSource.fetch`), under
the same size cap and file rules as an upload; `register_from` then runs the one registration
pipeline (`AdapterService.register_folder`: copy -> validate -> store -> record). Sources:
`ArchiveSource` (an uploaded .tar.gz / .zip), `FolderSource` (a server folder under
`adapter_roots`), `HubSource` (a Hugging Face hub repository) and `adapters.s3.S3Source`
(`s3://bucket/prefix` on S3-compatible storage). `source_for(uri)` picks one from a URI.

Nothing here echoes a server path, an endpoint or a credential, or lists a folder's files in an
error: the caller learns that a source was refused and why, the server log gets the details."""

from __future__ import annotations

import concurrent.futures
import logging
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Protocol

from adapters.archive import CONFIG_FILE, WEIGHTS_FILE, copy_adapter_folder, extract_archive
from adapters.errors import AdapterTooLarge, InvalidAdapter, SourceNotAllowed

if TYPE_CHECKING:
    from adapters.registry import AdapterVersion, Tenant
    from adapters.s3 import S3Config
    from adapters.service import AdapterService

log = logging.getLogger(__name__)

_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}(?:/[A-Za-z0-9][A-Za-z0-9_.-]{0,95})?\Z")
_REVISION = re.compile(r"[A-Za-z0-9][A-Za-z0-9_./-]{0,127}\Z")


def resolve_allowed_folder(raw: str, roots: list[Path]) -> Path:
    """The real path of `raw` if it is a folder inside one of `roots` (after resolving every
    link, so a link cannot lead outside); else SourceNotAllowed or InvalidAdapter."""
    if not roots:
        raise SourceNotAllowed(
            "registering server-side folders is off: the server has no adapter_roots configured"
        )
    path = Path(raw)
    if not path.is_absolute():
        raise InvalidAdapter("`path` must be an absolute path", "invalid_path")
    try:
        resolved = path.resolve(strict=False)
    except (OSError, RuntimeError) as exc:  # a link loop
        raise InvalidAdapter("`path` cannot be resolved", "invalid_path") from exc
    if not any(resolved.is_relative_to(root.resolve()) for root in roots):
        log.warning("refused adapter folder outside adapter_roots: %s -> %s", raw, resolved)
        raise SourceNotAllowed("`path` is not inside one of the server's adapter_roots")
    if not resolved.is_dir():
        raise InvalidAdapter("the adapter source is not a folder", "not_a_folder")
    return resolved


def fetch_hub_adapter(
    hub_id: str,
    revision: str | None,
    *,
    max_bytes: int,
    cache_dir: Path | None = None,
    local_files_only: bool | None = None,
) -> tuple[Path, Path]:
    """Download (or find in the hub cache) the two adapter files of `hub_id` at `revision`.

    Returns (snapshot folder, repository cache folder): the snapshot's files are links into the
    repository folder's blobs, which `copy_adapter_folder(links_within=...)` follows. Online,
    the files' sizes are checked against `max_bytes` before anything is downloaded."""
    from huggingface_hub import HfApi, constants, snapshot_download

    if not _HUB_ID.match(hub_id) or ".." in hub_id:
        raise InvalidAdapter("`hub_id` must look like `org/name`", "invalid_hub_id")
    if revision is not None and (not _REVISION.match(revision) or ".." in revision):
        raise InvalidAdapter("`revision` must be a branch, tag or commit id", "invalid_revision")
    offline = constants.HF_HUB_OFFLINE if local_files_only is None else local_files_only
    files = [CONFIG_FILE, WEIGHTS_FILE]
    try:
        if not offline:
            sizes = {
                f.path: getattr(f, "size", 0) or 0
                for f in HfApi().get_paths_info(hub_id, files, revision=revision)
            }
            missing = [f for f in files if f not in sizes]
            if missing:
                raise InvalidAdapter(
                    f"`{hub_id}` has no {', '.join(missing)}: not a PEFT LoRA adapter",
                    "missing_file",
                )
            total = sum(sizes.values())
            if total > max_bytes:
                raise AdapterTooLarge(f"`{hub_id}` is {total} bytes, over the limit of {max_bytes}")
        snapshot = Path(
            snapshot_download(
                hub_id,
                revision=revision,
                allow_patterns=files,
                cache_dir=cache_dir,
                local_files_only=offline,
            )
        )
    except (InvalidAdapter, AdapterTooLarge):
        raise
    except Exception as exc:  # noqa: BLE001 - a bad id, revision, network: the caller's to fix
        log.warning("hub fetch of %s@%s failed: %r", hub_id, revision, exc)
        raise InvalidAdapter(
            f"could not fetch `{hub_id}` from the hub ({type(exc).__name__})", "hub_fetch_failed"
        ) from exc
    return snapshot, snapshot.parent.parent


# ---- the interface -----------------------------------------------------------------------------


class AdapterSource(Protocol):
    """One place an adapter can come from."""

    @property
    def label(self) -> str:
        """What the registry records as the version's source (`upload`, `folder`,
        `hub:<id>`, `s3://bucket/prefix/`); responses show only its kind or hub id."""
        ...

    admin_only: bool  # server-side sources (folders, hub) are the admin's to name

    def fetch(self, into: Path, max_bytes: int) -> None:
        """Create the folder `into` holding adapter_config.json and adapter_model.safetensors,
        at most `max_bytes` in all (counted while fetching); raise an AdapterError otherwise."""
        ...


@dataclass
class ArchiveSource:
    """An uploaded archive (a path or a seekable binary file)."""

    archive: Path | BinaryIO
    label: str = "upload"
    admin_only: bool = False

    def fetch(self, into: Path, max_bytes: int) -> None:
        extract_archive(self.archive, into, max_bytes)


@dataclass
class FolderSource:
    """A server folder, which must lie inside one of `roots` (the `adapter_roots` setting)."""

    path: str
    roots: list[Path]
    label: str = "folder"
    admin_only: bool = True

    def fetch(self, into: Path, max_bytes: int) -> None:
        folder = resolve_allowed_folder(self.path, self.roots)
        copy_adapter_folder(folder, into, max_bytes)
        log.info("adapter fetched from folder %s", folder)


@dataclass
class HubSource:
    """A Hugging Face hub repository at a revision, fetched within `timeout` seconds (the
    download may finish later into the hub cache; its result is then dropped)."""

    hub_id: str
    revision: str | None = None
    timeout: float | None = None
    cache_dir: Path | None = None
    local_files_only: bool | None = None
    admin_only: bool = True

    @property
    def label(self) -> str:
        return f"hub:{self.hub_id}"

    def fetch(self, into: Path, max_bytes: int) -> None:
        pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="hub-fetch")
        download = pool.submit(
            fetch_hub_adapter,
            self.hub_id,
            self.revision,
            max_bytes=max_bytes,
            cache_dir=self.cache_dir,
            local_files_only=self.local_files_only,
        )
        pool.shutdown(wait=False)
        try:
            snapshot, repo = download.result(timeout=self.timeout)
        except concurrent.futures.TimeoutError as exc:
            raise InvalidAdapter(
                f"Fetching `{self.hub_id}` from the hub took over {self.timeout:g} s.",
                "hub_fetch_failed",
            ) from exc
        copy_adapter_folder(snapshot, into, max_bytes, links_within=repo)


@dataclass
class SourceRules:
    """What `source_for` may build: folder roots, the hub timeout, the S3 settings."""

    adapter_roots: list[Path] = field(default_factory=list)
    hub_timeout: float | None = None
    s3: S3Config | None = None


def source_for(uri: str, rules: SourceRules, tenant_name: str) -> AdapterSource:
    """The source a URI names: `s3://bucket/prefix`, `hf://org/name[@revision]`,
    `file:///abs/folder` or `/abs/folder`. `tenant_name` fills `{tenant}` in S3 prefix rules."""
    if not isinstance(uri, str) or len(uri) > 2048 or not uri.isprintable():
        raise InvalidAdapter(
            "`uri` must be a printable string of at most 2048 characters", "invalid_uri"
        )
    scheme, sep, rest = uri.partition("://")
    if sep and scheme == "s3":
        from adapters.s3 import S3Source, parse_s3_uri

        if rules.s3 is None:
            raise SourceNotAllowed("registering from S3 is off: the server has no S3 settings")
        bucket, prefix = parse_s3_uri(uri)
        return S3Source(bucket, prefix, rules.s3, tenant_name)
    if sep and scheme in ("hf", "hub"):
        hub_id, _, revision = rest.partition("@")
        return HubSource(hub_id, revision or None, timeout=rules.hub_timeout)
    if sep and scheme == "file":
        return FolderSource(rest, rules.adapter_roots)
    if not sep and uri.startswith("/"):
        return FolderSource(uri, rules.adapter_roots)
    raise InvalidAdapter(
        "`uri` must start with s3://, hf://, file:// or be an absolute server path", "invalid_uri"
    )


def register_from(
    service: AdapterService, tenant: Tenant, name: str, source: AdapterSource
) -> AdapterVersion:
    """Fetch `source` into a staging folder, then run the registration pipeline on it (the same
    copy, validation, store and registry steps as every other registration)."""
    staged = service.store.new_staging_dir()
    try:
        source.fetch(staged, service.max_bytes)
        return service.register_folder(tenant, name, staged, source.label)
    finally:
        shutil.rmtree(staged, ignore_errors=True)

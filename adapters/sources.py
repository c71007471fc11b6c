"""Server-side adapter sources the admin may register from: a folder under an allowed root, or
a Hugging Face hub repository. Both end in `AdapterService.register_folder`.

Nothing here echoes a server path or lists a folder's files in an error: the caller learns that
a source was refused and why, the server log gets the details."""

from __future__ import annotations

import logging
import re
from pathlib import Path

from adapters.archive import CONFIG_FILE, WEIGHTS_FILE
from adapters.errors import AdapterTooLarge, InvalidAdapter, SourceNotAllowed

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

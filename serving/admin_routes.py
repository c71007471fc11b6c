"""Tenant and adapter management routes."""

from __future__ import annotations

import asyncio
import logging
import tempfile
from pathlib import Path

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile as StarletteUpload

from adapters.errors import AdapterTooLarge, NotFound
from adapters.registry import AdapterVersion, Tenant
from serving import metrics
from serving.auth import current_tenant, is_admin_request, require_writer
from serving.errors import APIError
from serving.state import ServerState, server_state

log = logging.getLogger(__name__)
router = APIRouter()


async def _owner(
    request: Request, state: ServerState, tenant: Tenant, tenant_name: str | None
) -> Tenant:
    """The tenant an admin acts for (`tenant` field), or the caller itself."""
    if not tenant_name:
        return tenant
    if not is_admin_request(request, state):
        raise APIError(403, "Only the admin may act for another tenant.", "admin_required")
    found = await run_in_threadpool(state.adapters.registry.tenant_by_name, tenant_name)
    if found is not None:
        return found
    raise APIError(404, f"Tenant `{tenant_name}` does not exist.", "tenant_not_found")


async def _spool(upload: StarletteUpload, limit: int) -> Path:
    """Copy the uploaded archive to a temporary file, refusing it past `limit` bytes."""
    fd, name = tempfile.mkstemp(prefix="tenantlora-upload-")
    path = Path(name)
    written = 0
    with open(fd, "wb") as out:
        while chunk := await upload.read(1 << 20):
            written += len(chunk)
            if written > limit:
                path.unlink(missing_ok=True)
                raise AdapterTooLarge(f"upload exceeds the limit of {limit} bytes")
            out.write(chunk)
    return path


@router.post("/v1/adapters", status_code=201, dependencies=[Depends(require_writer)])
async def upload_adapter(
    request: Request,
    tenant: Tenant = Depends(current_tenant),
    state: ServerState = Depends(server_state),
) -> dict:
    """Multipart form: `name` and `file` (a .tar.gz or .zip of a PEFT adapter). The admin may send
    `path` (a folder on the server) or `hub_id` instead of `file`, and `tenant` to act for one."""
    limit = state.settings.max_adapter_bytes
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit + (1 << 20):
        raise AdapterTooLarge(f"upload of {length} bytes exceeds the limit of {limit} bytes")
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise APIError(
            415,
            "Send the adapter as multipart/form-data (fields `name`, `file`).",
            "unsupported_media_type",
        )
    form = await request.form(max_files=1, max_fields=8)
    try:
        name = form.get("name")
        if not isinstance(name, str) or not name:
            raise APIError(400, "Form field `name` is required.", "missing_name", "name")
        owner = await _owner(request, state, tenant, _str(form.get("tenant")))
        upload, folder, hub_id = form.get("file"), _str(form.get("path")), _str(form.get("hub_id"))
        if isinstance(upload, StarletteUpload):
            archive = await _spool(upload, limit)
            try:
                version = await run_in_threadpool(
                    state.adapters.register_archive, owner, name, archive
                )
            finally:
                archive.unlink(missing_ok=True)
        elif folder or hub_id:
            if not is_admin_request(request, state):
                raise APIError(
                    403,
                    "Only the admin may register server-side folders or hub ids.",
                    "admin_required",
                )
            source = Path(folder) if folder else await run_in_threadpool(_fetch_hub_adapter, hub_id)
            version = await run_in_threadpool(
                state.adapters.register_folder,
                owner,
                name,
                source,
                None if folder else f"hub:{hub_id}",
            )
        else:
            raise APIError(
                400, "Form field `file` (the adapter archive) is required.", "missing_file", "file"
            )
    finally:
        await form.close()
    log.info("registered adapter %s for tenant %s", version.pinned_name, owner.name)
    return version.public_dict()


def _str(value) -> str | None:
    return value if isinstance(value, str) and value else None


def _fetch_hub_adapter(hub_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                hub_id, allow_patterns=["adapter_config.json", "adapter_model.safetensors"]
            )
        )
    except Exception as exc:  # noqa: BLE001 - any hub failure is the caller's bad id or no network
        raise APIError(
            400, f"Could not fetch `{hub_id}` from the hub: {exc}", "hub_fetch_failed"
        ) from exc


@router.get("/v1/adapters")
async def list_adapters(
    tenant: Tenant = Depends(current_tenant), state: ServerState = Depends(server_state)
) -> dict:
    return {"object": "list", "data": [a.public_dict() for a in state.catalog.visible(tenant)]}


@router.get("/v1/adapters/{name}")
async def get_adapter(
    name: str, tenant: Tenant = Depends(current_tenant), state: ServerState = Depends(server_state)
) -> dict:
    adapter = state.catalog.resolve(tenant, name)
    if adapter is None:
        raise APIError(404, f"Adapter `{name}` does not exist.", "adapter_not_found")
    versions = [
        a.public_dict()
        for a in state.catalog.visible(tenant)
        if a.name == adapter.name and a.tenant_id == adapter.tenant_id
    ]
    return {**adapter.public_dict(), "versions": versions}


@router.delete("/v1/adapters/{name}", dependencies=[Depends(require_writer)])
async def delete_adapter(
    name: str,
    request: Request,
    tenant: Tenant = Depends(current_tenant),
    state: ServerState = Depends(server_state),
) -> dict:
    owner = await _owner(request, state, tenant, request.query_params.get("tenant"))
    if owner.is_public and not is_admin_request(request, state):
        raise APIError(404, f"Adapter `{name}` does not exist.", "adapter_not_found")
    try:
        removed = state.adapters.delete(owner, name)
    except NotFound as exc:
        raise APIError(404, f"Adapter `{name}` does not exist.", "adapter_not_found") from exc
    retire_in_background(state, removed)
    return {
        "object": "adapter.deleted",
        "deleted": True,
        "id": name,
        "versions": [v.version for v in removed],
    }


_retiring: set[asyncio.Task] = set()  # held so the event loop does not drop them midway


def retire_in_background(state: ServerState, versions: list[AdapterVersion]) -> None:
    """Drop deleted versions from the engine once their in-flight requests end, then purge
    their files unless another live version has the same content."""
    for version in versions:
        task = asyncio.create_task(_retire(state, version))
        _retiring.add(task)
        task.add_done_callback(_retiring.discard)


async def _retire(state: ServerState, version: AdapterVersion) -> None:
    """Drop a deleted adapter from the engine once its in-flight requests are done."""
    try:
        await state.lifecycle.retire(version.id)
        metrics.forget_adapter(version.tenant_name, version.pinned_name, version.engine_name)
        await run_in_threadpool(state.adapters.purge_files, [version])
    except Exception:  # noqa: BLE001 - background clean-up; logged, never raised to a client
        log.exception("retiring adapter %s failed", version.engine_name)

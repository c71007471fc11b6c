"""Tenant and adapter management routes."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.datastructures import UploadFile as StarletteUpload

from adapters.errors import NotFound, SourceNotAllowed
from adapters.registry import AdapterVersion, Tenant
from adapters.s3 import S3Config
from adapters.sources import (
    AdapterSource,
    ArchiveSource,
    FolderSource,
    HubSource,
    SourceRules,
    register_from,
    source_for,
)
from serving import metrics
from serving.auth import current_tenant, is_admin_request, require_writer
from serving.errors import APIError
from serving.state import ServerState, server_state
from serving.uploads import read_upload_form, upload_slots

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


@router.post("/v1/adapters", status_code=201, dependencies=[Depends(require_writer)])
async def upload_adapter(
    request: Request,
    tenant: Tenant = Depends(current_tenant),
    state: ServerState = Depends(server_state),
) -> dict:
    """Multipart form (or a JSON object): `name` and `file` (a .tar.gz or .zip of a PEFT adapter),
    or `uri` (`s3://bucket/prefix` under `s3_allowed_prefixes`; for the admin also `hf://` and
    server folders). The admin may send `path` (a folder under `adapter_roots`) or `hub_id`
    (and `revision`) instead of `file`, and `tenant` to act for one. A tenant's quota and concurrent-upload limit are checked before the
    body is read (serving/uploads.py)."""
    settings = state.settings
    admin = is_admin_request(request, state)
    with contextlib.ExitStack() as held:
        if not admin:
            held.enter_context(
                upload_slots(request, settings.max_concurrent_uploads).hold(tenant.id)
            )
            await run_in_threadpool(state.adapters.check_room, tenant)
        form = await read_upload_form(request, settings.max_adapter_bytes)
        try:
            version = await _register_from_form(request, state, tenant, form, admin)
        finally:
            await form.close()
    log.info("registered adapter %s", version.engine_name)
    return version.public_dict()


async def _register_from_form(
    request: Request, state: ServerState, tenant: Tenant, form: FormData, admin: bool
) -> AdapterVersion:
    name = form.get("name")
    if not isinstance(name, str) or not name:
        raise APIError(400, "Form field `name` is required.", "missing_name", "name")
    owner = await _owner(request, state, tenant, _str(form.get("tenant")))
    param = "uri"
    try:
        source, param = _form_source(state, owner, form)
        if source.admin_only and not admin:
            raise APIError(
                403, "Only the admin may register server-side folders or hub ids.", "admin_required"
            )
        return await run_in_threadpool(register_from, state.adapters, owner, name, source)
    except SourceNotAllowed as exc:
        raise APIError(403, str(exc), exc.code, param) from exc


def _form_source(state: ServerState, owner: Tenant, form: FormData) -> tuple[AdapterSource, str]:
    """The source the form names (adapters/sources.py) and the field that named it: `file` (an
    archive), `uri` (s3://, hf://, file://), `path` (a server folder) or `hub_id`."""
    upload, uri = form.get("file"), _str(form.get("uri"))
    folder, hub_id = _str(form.get("path")), _str(form.get("hub_id"))
    settings = state.settings
    if isinstance(upload, StarletteUpload):
        return ArchiveSource(upload.file), "file"
    rules = SourceRules(
        settings.adapter_roots, settings.hub_timeout_seconds, S3Config.from_settings(settings)
    )
    if uri:
        return source_for(uri, rules, owner.name), "uri"
    if folder:
        return FolderSource(folder, rules.adapter_roots), "path"
    if hub_id:
        return HubSource(hub_id, _str(form.get("revision")), timeout=rules.hub_timeout), "hub_id"
    raise APIError(
        400,
        "Form field `file` (the adapter archive) or `uri` (e.g. s3://bucket/prefix) is required.",
        "missing_file",
        "file",
    )


def _str(value) -> str | None:
    return value if isinstance(value, str) and value else None


@router.get("/v1/adapters")
async def list_adapters(
    tenant: Tenant = Depends(current_tenant), state: ServerState = Depends(server_state)
) -> dict:
    visible = await run_in_threadpool(state.catalog.visible, tenant)
    return {"object": "list", "data": [a.public_dict() for a in visible]}


@router.get("/v1/adapters/{name}")
async def get_adapter(
    name: str, tenant: Tenant = Depends(current_tenant), state: ServerState = Depends(server_state)
) -> dict:
    adapter = await state.resolver.find_adapter(tenant, name)
    if adapter is None:
        raise APIError(404, f"Adapter `{name}` does not exist.", "adapter_not_found")
    versions = [
        a.public_dict()
        for a in await run_in_threadpool(state.catalog.visible, tenant)
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
        removed = await run_in_threadpool(state.adapters.delete, owner, name)
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

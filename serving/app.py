"""The FastAPI application: start-up wiring, health and metrics routes."""

from __future__ import annotations

import argparse
import logging
import time
from contextlib import asynccontextmanager
from ipaddress import ip_address
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from adapters.catalog import AdapterCatalog
from adapters.keys import keys_equal
from adapters.registry import Registry
from adapters.s3_watch import start_s3_watch
from adapters.service import AdapterService
from adapters.store import AdapterStore
from adapters.usage import UsageLedger
from adapters.validation import BaseModelSpec
from serving import metrics
from serving.admin_routes import router as admin_router
from serving.admission import Admission
from serving.auth import Authenticator, bearer_key
from serving.base_model import default_served_name, resolve_base_model
from serving.cache_salt import CacheSalts
from serving.engine import AdapterLifecycle, start_engine
from serving.engine_headers import DropEngineControlHeaders
from serving.errors import APIError, install_error_handlers
from serving.json_body import JsonBodyLimit
from serving.openai_routes import router as openai_router
from serving.resolver import TenantResolver
from serving.settings import Settings
from serving.state import ServerState, server_state
from serving.tenant_routes import router as tenant_router
from serving.vllm_compat import check_vllm
from serving.vllm_compat.serving import build_serving, build_tokenization
from serving.vllm_routes import router as vllm_router

log = logging.getLogger(__name__)


def parse_static_loras(specs: list[str]) -> list[tuple[str, Path]]:
    pairs = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--lora expects NAME=PATH, got {spec!r}")
        pairs.append((name, Path(path).expanduser()))
    return pairs


def build_adapter_service(settings: Settings, base_name: str, base_path: Path) -> AdapterService:
    registry = Registry(settings.registry_url)
    public = registry.ensure_public_tenant()
    quotas = {"max_adapters": settings.tenant_max_adapters, "max_bytes": settings.tenant_max_bytes}
    if (public.max_adapters, public.max_bytes) != tuple(quotas.values()):
        registry.update_tenant(public, **quotas)  # `public` has the normal quotas, no more
    store = AdapterStore(settings.store_dir)
    spec = BaseModelSpec.for_base(base_name, base_path)  # shapes from config.json (issue 15)
    return AdapterService(
        registry,
        store,
        spec,
        max_rank=settings.max_lora_rank,
        max_bytes=settings.max_adapter_bytes,
    )


def check_listen_address(settings: Settings) -> None:
    """Refuse to serve beyond this machine without an admin key: every caller would be the
    anonymous `public` tenant."""
    if settings.admin_key is not None or settings.host == "localhost":
        return
    try:
        loopback = ip_address(settings.host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise SystemExit(
            f"tenantlora: refusing to listen on {settings.host} without an admin key. Set "
            "TENANTLORA_ADMIN_KEY (then every request needs a key), or listen on 127.0.0.1."
        )


@asynccontextmanager
async def _lifespan(app: FastAPI):
    settings: Settings = app.state.settings
    started = time.perf_counter()
    check_vllm()
    base_path = resolve_base_model(settings.base_model, settings.models_dir)
    base_name = settings.served_model_name or default_served_name(settings.base_model)
    adapters = build_adapter_service(settings, base_name, base_path)
    adapters.reconcile()  # orphan store folders, staging leftovers; logs rows without files
    for name, folder in parse_static_loras(settings.loras):
        version = adapters.ensure_static(name, folder)
        log.info("static adapter %s -> %s", name, version.pinned_name)
    start_s3_watch(settings, adapters)  # watched S3 prefixes, a daemon thread (issue 15)
    engine = metrics.ObservedEngine(start_engine(settings, base_path, base_name))
    lifecycle = AdapterLifecycle(engine, on_load=metrics.observe_load)
    models, chat, completion = build_serving(engine, base_name, settings)
    catalog = AdapterCatalog(adapters.registry)
    usage = UsageLedger(adapters.registry, settings.usage_flush_seconds)
    usage.start()
    admission = Admission(settings)
    admin_key = settings.admin_key.get_secret_value() if settings.admin_key else None
    app.state.engine_client = engine
    app.state.tenantlora = ServerState(
        settings=settings,
        base_name=base_name,
        adapters=adapters,
        catalog=catalog,
        auth=Authenticator(
            adapters.registry,
            catalog.public,
            admin_key=admin_key,
            requires_auth=settings.requires_auth,
            ttl=settings.lookup_cache_seconds,
        ),
        resolver=TenantResolver(catalog, base_name, ttl=settings.lookup_cache_seconds),
        engine=engine,
        lifecycle=lifecycle,
        serving_models=models,
        serving_chat=chat,
        serving_completion=completion,
        serving_tokenization=build_tokenization(chat),
        started_at=time.time(),
        cache_salts=CacheSalts(share_base=settings.share_base_prefix_cache),
        usage=usage,
        admission=admission,
    )
    log.info("tenantlora ready in %.1f s: base model %s", time.perf_counter() - started, base_name)
    try:
        yield
    finally:
        await admission.flush()
        engine.shutdown()
        usage.close()
        adapters.registry.close()


def _metrics_allowed(request: Request, settings: Settings) -> bool:
    keys = [k.get_secret_value() for k in (settings.admin_key, settings.metrics_key) if k]
    if not keys:
        return True  # a single-user server: nothing on the page belongs to anyone else
    presented = bearer_key(request)
    return presented is not None and any(keys_equal(presented, k) for k in keys)


def create_app(settings: Settings) -> FastAPI:
    check_listen_address(settings)
    docs = settings.enable_docs
    app = FastAPI(
        title="tenantlora",
        version="0.1.0",
        lifespan=_lifespan,
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
        openapi_url="/openapi.json" if docs else None,
    )
    app.state.settings = settings
    # vLLM's exception handlers read these two.
    app.state.args = argparse.Namespace(log_error_stack=False)
    app.state.server = None  # set to the uvicorn.Server by `tenantlora serve`
    install_error_handlers(app)
    app.add_middleware(
        JsonBodyLimit, max_bytes=settings.max_request_bytes, max_depth=settings.max_json_depth
    )
    app.add_middleware(DropEngineControlHeaders)
    app.include_router(openai_router)
    app.include_router(admin_router)
    app.include_router(tenant_router)
    app.include_router(vllm_router)

    @app.get("/health")
    async def health(state: ServerState = Depends(server_state)) -> JSONResponse:
        try:
            await state.engine.check_health()
        except Exception:  # noqa: BLE001 - an unhealthy engine is reported, not raised
            log.exception("health check failed")
            return JSONResponse({"status": "not ready"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prometheus_metrics(
        request: Request, state: ServerState = Depends(server_state)
    ) -> Response:
        if not _metrics_allowed(request, state.settings):
            raise APIError(
                401, "GET /metrics needs the admin or metrics key.", "metrics_key_required"
            )
        try:
            metrics.ADAPTERS_RESIDENT.set(await state.lifecycle.resident_count())
        except Exception:  # noqa: BLE001 - the scrape must not fail with the engine
            log.exception("could not ask the engine for its adapters")
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app

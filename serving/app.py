"""The FastAPI application: start-up wiring, health and metrics routes."""

from __future__ import annotations

import argparse
import logging
import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from adapters.catalog import AdapterCatalog
from adapters.registry import Registry
from adapters.service import AdapterService
from adapters.store import AdapterStore
from adapters.validation import BaseModelSpec
from serving import metrics
from serving.admin_routes import router as admin_router
from serving.base_model import default_served_name, resolve_base_model
from serving.engine import AdapterLifecycle, start_engine
from serving.errors import install_error_handlers
from serving.openai_routes import router as openai_router
from serving.settings import Settings
from serving.state import ServerState, server_state
from serving.vllm_serving import build_serving

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
    store = AdapterStore(settings.store_dir)
    spec = BaseModelSpec.from_checkpoint(base_name, base_path)
    return AdapterService(
        registry,
        store,
        spec,
        max_rank=settings.max_lora_rank,
        max_bytes=settings.max_adapter_bytes,
    )


@asynccontextmanager
async def _lifespan(app: FastAPI):
    settings: Settings = app.state.settings
    started = time.perf_counter()
    base_path = resolve_base_model(settings.base_model, settings.models_dir)
    base_name = settings.served_model_name or default_served_name(settings.base_model)
    adapters = build_adapter_service(settings, base_name, base_path)
    for name, folder in parse_static_loras(settings.loras):
        version = adapters.ensure_static(name, folder)
        log.info("static adapter %s -> %s", name, version.pinned_name)
    engine = metrics.ObservedEngine(start_engine(settings, base_path, base_name))
    lifecycle = AdapterLifecycle(
        engine,
        capacity=max(settings.max_cpu_loras, settings.max_loras),
        on_load=metrics.observe_load,
        on_resident=metrics.ADAPTERS_RESIDENT.set,
    )
    models, chat, completion = build_serving(engine, base_name, str(base_path))
    app.state.engine_client = engine
    app.state.tenantlora = ServerState(
        settings=settings,
        base_name=base_name,
        base_path=str(base_path),
        adapters=adapters,
        catalog=AdapterCatalog(adapters.registry),
        engine=engine,
        lifecycle=lifecycle,
        serving_models=models,
        serving_chat=chat,
        serving_completion=completion,
        started_at=time.time(),
    )
    log.info("tenantlora ready in %.1f s: base model %s", time.perf_counter() - started, base_name)
    try:
        yield
    finally:
        engine.shutdown()
        adapters.registry.close()


def create_app(settings: Settings) -> FastAPI:
    app = FastAPI(title="tenantlora", version="0.1.0", lifespan=_lifespan)
    app.state.settings = settings
    # vLLM's exception handlers read these two.
    app.state.args = argparse.Namespace(log_error_stack=False)
    app.state.server = None  # set to the uvicorn.Server by `tenantlora serve`
    install_error_handlers(app)
    app.include_router(openai_router)
    app.include_router(admin_router)

    @app.get("/health")
    async def health(state: ServerState = Depends(server_state)) -> JSONResponse:
        try:
            await state.engine.check_health()
        except Exception as exc:  # noqa: BLE001 - an unhealthy engine is reported, not raised
            return JSONResponse({"status": "unhealthy", "detail": str(exc)}, status_code=503)
        return JSONResponse({"status": "ok", "model": state.base_name})

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app

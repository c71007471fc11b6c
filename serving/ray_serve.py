"""Scale-out on Ray Serve: several replicas of the tenantlora engine behind the same OpenAI
routes, with requests for one adapter routed to the replicas that already loaded it.

Two deployments:

- `TenantloraEngine` (N replicas, one vLLM engine each). Every replica builds tenantlora's own
  FastAPI app with `serving.app.create_app` (the same routes, auth, errors and metrics as
  `tenantlora serve`), runs its lifespan (registry, store, vLLM engine) and serves the HTTP
  requests the gateway hands it, in process, as ASGI calls. A `@serve.multiplexed` loader keyed
  by the adapter version id loads an adapter into that replica's engine, so Ray knows which
  replicas hold which adapters. Every response carries `x-tenantlora-replica` (the Ray replica
  id) and `x-tenantlora-replica-pid`.
- `TenantloraGateway` (the HTTP ingress, no engine). For each request it reads the bearer key and
  the body's `model`, resolves the adapter with the same code the server uses
  (`serving.auth.Authenticator`, `serving.resolver.TenantResolver`) and forwards the request, unchanged,
  to an engine replica with `multiplexed_model_id` set to the adapter's version id: Ray routes it
  to a replica that already loaded that adapter, or else to the one with the fewest adapters.
  Requests that name no adapter (the base model, admin routes, /health) go to any replica. A
  replica that dies before it answered is retried on another one.

The replicas share the registry and the adapter store: a PostgreSQL `database_url` (or, on one
machine, the SQLite file) and a data dir every replica can read (one machine, or a shared file
system). So an adapter registered through one replica serves from every other.

Run it (the settings come from TENANTLORA_* variables, as for `tenantlora serve`):

    tenantlora ray serve --replicas 2 --port 8000       # starts a local Ray cluster
    tenantlora ray serve --address auto --replicas 4    # on a running Ray cluster
    serve run serving.ray_serve:build_app replicas=2            # Ray's own CLI
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from serving.settings import Settings

log = logging.getLogger(__name__)

REPLICA_HEADER = "x-tenantlora-replica"
REPLICA_PID_HEADER = "x-tenantlora-replica-pid"
# Routes whose JSON body names a model: the ones routed by adapter.
MODEL_ROUTES = {"/v1/chat/completions", "/v1/completions"}
FORWARD_ATTEMPTS = 4


# ---- engine replicas ---------------------------------------------------------------------------


class TenantloraEngine:
    """One replica: tenantlora's FastAPI app and its vLLM engine, in this Ray actor."""

    async def __init__(self, settings: Settings) -> None:
        from serving.app import create_app
        from serving.engine import on_gpu

        self.settings = settings
        self.app: FastAPI = create_app(settings)
        # The app's lifespan builds the registry, store and the engine (what uvicorn would run).
        self._lifespan = self.app.router.lifespan_context(self.app)
        await self._lifespan.__aenter__()
        self.state = self.app.state.tenantlora
        context = serve.get_replica_context()
        self.replica_id = context.replica_id.unique_id if context else f"pid-{os.getpid()}"
        self._headers = [
            (REPLICA_HEADER.encode(), self.replica_id.encode()),
            (REPLICA_PID_HEADER.encode(), str(os.getpid()).encode()),
        ]

        # Ray's routing table holds as many adapters per replica as the engine's cache does
        # (device slots + host cache); vLLM evicts and reloads on its own.
        async def load_adapter(model_id: str):
            return await self._load(model_id)

        self._load_adapter = serve.multiplexed(
            max_num_models_per_replica=settings.adapter_cache_size(on_gpu())
        )(load_adapter)
        log.info("tenantlora replica %s ready (pid %d)", self.replica_id, os.getpid())

    async def _load(self, model_id: str):
        """Load the adapter version `model_id` into this replica's engine (the cold start)."""
        from serving.resolver import lora_request_for

        version = await asyncio.to_thread(self.state.adapters.registry.get_version, int(model_id))
        await self.state.lifecycle.ensure_loaded(lora_request_for(version))
        return version

    async def check_health(self) -> None:
        """Ray's periodic health check: a dead engine makes Ray replace this replica."""
        await self.state.engine.check_health()

    async def __del__(self) -> None:
        """Ray Serve awaits this when it stops the replica: stop the engine, close the registry."""
        lifespan, self._lifespan = getattr(self, "_lifespan", None), None
        if lifespan is not None:
            await lifespan.__aexit__(None, None, None)

    async def handle_http(self, request: dict, body: bytes) -> AsyncIterator[Any]:
        """Serve one HTTP request through the app. Yields the response start
        `(status, headers)`, then the body in chunks (streamed responses stay streamed)."""
        model_id = serve.get_multiplexed_model_id()
        if model_id:
            try:
                await self._load_adapter(model_id)
            except Exception:  # noqa: BLE001 - the app answers with its own 422 for this adapter
                log.exception("adapter version %s failed to load", model_id)

        messages: asyncio.Queue[dict] = asyncio.Queue()
        finished = asyncio.Event()
        body_sent = False

        async def receive() -> dict:
            nonlocal body_sent
            if not body_sent:
                body_sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await finished.wait()  # the client is gone only when the caller stops reading
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            await messages.put(message)

        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": request["method"],
            "scheme": "http",
            "path": request["path"],
            "raw_path": request["path"].encode(),
            "root_path": "",
            "query_string": request["query_string"].encode(),
            "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in request["headers"]],
            "client": tuple(request["client"]) if request.get("client") else None,
            "server": ("127.0.0.1", 0),
            "state": {},
        }

        async def run_app() -> None:
            try:
                await self.app(scope, receive, send)
            finally:
                await messages.put({"type": "tenantlora.done"})

        task = asyncio.create_task(run_app())
        try:
            while True:
                message = await messages.get()
                kind = message["type"]
                if kind == "http.response.start":
                    headers = [
                        (k.decode("latin-1"), v.decode("latin-1"))
                        for k, v in [*message.get("headers", []), *self._headers]
                    ]
                    yield (message["status"], headers)
                elif kind == "http.response.body":
                    if message.get("body"):
                        yield message["body"]
                    if not message.get("more_body", False):
                        break
                elif kind == "tenantlora.done":
                    break
            try:
                await task
            except Exception:  # noqa: BLE001 - the response went out; the app's error is logged
                log.exception(
                    "request %s %s failed after its response", request["method"], request["path"]
                )
        finally:
            finished.set()
            if not task.done():
                task.cancel()


# ---- the gateway (HTTP ingress) ----------------------------------------------------------------

gateway_app = FastAPI(title="tenantlora (Ray Serve)", version="0.1.0")


class TenantloraGateway:
    """Routes each request to an engine replica by the adapter it names."""

    def __init__(self, engine: DeploymentHandle, settings: Settings) -> None:
        from adapters.catalog import AdapterCatalog
        from adapters.registry import Registry
        from serving.auth import Authenticator
        from serving.resolver import TenantResolver

        self.engine = engine
        self.settings = settings
        catalog = AdapterCatalog(Registry(settings.registry_url))
        admin_key = settings.admin_key.get_secret_value() if settings.admin_key else None
        self.auth = Authenticator(
            catalog.registry,
            catalog.public,
            admin_key=admin_key,
            requires_auth=settings.requires_auth,
            ttl=settings.lookup_cache_seconds,
        )
        # The base model's name is the replicas' business: any name that is no adapter routes
        # to any replica.
        self.resolver = TenantResolver(catalog, base_name="", ttl=settings.lookup_cache_seconds)

    async def routing_key(self, request: Request, body: bytes) -> str:
        """The adapter version id this request will run (as a string), or "" for none."""
        import json

        from serving.auth import bearer_key
        from serving.errors import APIError

        if request.url.path not in MODEL_ROUTES or request.method != "POST":
            return ""
        try:
            model = json.loads(body).get("model")
        except (ValueError, AttributeError):
            return ""  # the replica answers the 400
        if not isinstance(model, str) or not model:
            return ""
        try:
            caller = await self.auth.authenticate(bearer_key(request))
        except APIError:
            return ""  # the replica answers the 401
        adapter = await self.resolver.find_adapter(caller.tenant, model)
        return str(adapter.id) if adapter is not None else ""

    async def forward(self, request: Request) -> StreamingResponse | JSONResponse:
        body = await request.body()
        model_id = await self.routing_key(request, body)
        payload = {
            "method": request.method,
            "path": request.url.path,
            "query_string": request.url.query,
            "headers": list(request.headers.items()),
            "client": list(request.client) if request.client else None,
        }
        handle = self.engine.options(multiplexed_model_id=model_id, stream=True)
        stream, start = await _first_answer(handle, payload, body)

        async def rest() -> AsyncIterator[bytes]:
            try:
                async for chunk in stream:
                    yield chunk
            finally:
                stream.cancel()  # no-op once finished; stops the replica if the client left

        status, headers = start
        response = StreamingResponse(rest(), status_code=status)
        response.raw_headers = [
            (k.encode("latin-1"), v.encode("latin-1"))
            for k, v in headers
            if k.lower() != "content-length"
        ]
        return response


async def _first_answer(handle, payload: dict, body: bytes):
    """Start the call and wait for the response's start line, retrying on another replica if
    the one picked died first (a killed replica, a crashed engine)."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

    delay = 0.5
    for attempt in range(1, FORWARD_ATTEMPTS + 1):
        stream = handle.handle_http.remote(payload, body)
        try:
            start = await stream.__anext__()
            return stream, start
        except (RayActorError, ActorDiedError, ActorUnavailableError) as exc:
            if attempt == FORWARD_ATTEMPTS:
                raise
            log.warning("replica failed before answering (%s); retrying, attempt %d", exc, attempt)
            await asyncio.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"]


@serve.ingress(gateway_app)
class _Gateway(TenantloraGateway):
    @gateway_app.api_route("/{path:path}", methods=_METHODS, include_in_schema=False)
    async def proxy(self, request: Request, path: str):
        return await self.forward(request)


def build_deployments(
    settings: Settings,
    replicas: int = 2,
    engine_cpus: float = 1.0,
    max_ongoing_requests: int = 64,
):
    """The Ray Serve application: the gateway bound to `replicas` engine replicas."""
    engine = serve.deployment(
        TenantloraEngine,
        name="TenantloraEngine",
        num_replicas=replicas,
        max_ongoing_requests=max_ongoing_requests,
        ray_actor_options={"num_cpus": engine_cpus},
        health_check_period_s=10,
        health_check_timeout_s=60,
        graceful_shutdown_timeout_s=30,
    ).bind(settings)
    gateway = serve.deployment(
        _Gateway,
        name="TenantloraGateway",
        num_replicas=1,
        max_ongoing_requests=4 * max_ongoing_requests,
        ray_actor_options={"num_cpus": 0},
    )
    return gateway.bind(engine, settings)


def build_app(args: dict[str, str]):
    """`serve run serving.ray_serve:build_app replicas=2 engine_cpus=1 [any setting=value]`."""
    args = dict(args)
    replicas = int(args.pop("replicas", 2))
    engine_cpus = float(args.pop("engine_cpus", 1))
    return build_deployments(Settings(**args), replicas=replicas, engine_cpus=engine_cpus)

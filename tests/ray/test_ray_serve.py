"""Scale-out on Ray Serve with model multiplexing, with two replicas of the real engine.

A local Ray cluster on 127.0.0.1 runs `serving.ray_serve`: the gateway and two engine replicas
(each tenantlora's own app with a vLLM CPU engine). Over HTTP, with the OpenAI client and the
tenant's key, the test shows that requests for one adapter stay on the replica that loaded it,
that different adapters spread over both, that an adapter registered through one replica serves
from the other, and that a replica killed mid-run is replaced while every request succeeds.
The registry is the shared PostgreSQL one when TENANTLORA_TEST_POSTGRES_URL is given, else the
SQLite file in the data dir both replicas share."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
import threading
import time
import uuid
from urllib.parse import quote

import httpx
import pytest

from serving.settings import Settings

pytestmark = pytest.mark.engine

# Not imported at collection (it would load Ray into every test run); CI installs it, so there
# a missing Ray fails (the fixture's import) instead of skipping.
if importlib.util.find_spec("ray") is None and not os.environ.get("CI"):
    pytest.skip("ray[serve] is not installed", allow_module_level=True)

ADMIN_KEY = "ray-admin-key-0123456789"
APP = "tenantlora"
REPLICA = "x-tenantlora-replica"
STICKY_PAUSE = 1.5  # replicas push their loaded adapters to Ray's routers every 0.1 s


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    def __init__(self, url: str) -> None:
        self.url = url
        self.http = httpx.Client(base_url=url, timeout=300)
        self.replica_pids: set[int] = set()

    def admin(self, method: str, path: str, **kwargs) -> httpx.Response:
        return self.http.request(
            method, path, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, **kwargs
        )

    def register(self, tenant: str, name: str, folder) -> str:
        """Register a server-side adapter folder for `tenant`; return the replica that did."""
        r = self.admin(
            "POST",
            "/v1/adapters",
            data={"name": name, "path": str(folder), "tenant": tenant},
            files={"_": ("", b"")},
        )
        assert r.status_code == 201, r.text
        return r.headers[REPLICA]

    def chat(self, key: str, model: str) -> tuple[str, str]:
        """One short completion; returns (replica, text)."""
        r = self.http.post(
            "/v1/chat/completions",
            headers={"Authorization": f"Bearer {key}"},
            json={
                "model": model,
                "messages": [{"role": "user", "content": "Name a colour."}],
                "max_tokens": 3,
                "temperature": 0,
            },
        )
        assert r.status_code == 200, r.text
        self.replica_pids.add(int(r.headers[REPLICA + "-pid"]))
        return r.headers[REPLICA], r.json()["choices"][0]["message"]["content"]


@pytest.fixture(scope="module")
def cluster(base_model_path, tmp_path_factory):
    import psutil
    import ray
    from ray import serve

    from serving.ray_serve import build_deployments

    data_dir = tmp_path_factory.mktemp("ray-data")
    database_url, schema = None, None
    postgres = os.environ.get("TENANTLORA_TEST_POSTGRES_URL")
    if postgres:
        import psycopg

        schema = f"ray_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(postgres, autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {schema}")
        sep = "&" if "?" in postgres else "?"
        database_url = f"{postgres}{sep}options={quote(f'-csearch_path={schema}')}"
    settings = Settings(
        base_model=str(base_model_path),
        data_dir=data_dir,
        adapter_roots=[tmp_path_factory.getbasetemp()],
        database_url=database_url,
        admin_key=ADMIN_KEY,
        max_loras=2,
        max_cpu_loras=4,
        max_lora_rank=16,
        max_model_len=512,
        max_num_seqs=8,
        memory_share=0.1,
        log_level="warning",
    )
    port = _free_port()
    # Ray binds its services to the machine's address unless told it is not a cluster: keep
    # every socket on loopback. Its memory monitor would kill the replicas when the machine
    # (shared with other work) is near full; the kernel's OOM killer still guards it.
    # On a busy 2-core machine the proxy may take longer than Serve's 5 s readiness check, after
    # which the controller kills it (seen): give it a minute.
    env = {
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_memory_monitor_refresh_ms": "0",
        "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60",
        "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "60",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # for Ray's processes; this one read it at import:
    from ray._private import ray_constants
    from ray.serve._private import api as serve_api

    serve_api.HTTP_PROXY_TIMEOUT = 300  # serve.start's wait for the proxies (60 s by default)

    cluster_mode = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=256 * 1024 * 1024,
        configure_logging=False,
        log_to_driver=bool(os.environ.get("CI")),
    )
    assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}
    pids: set[int] = set()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(
            build_deployments(settings, replicas=2, engine_cpus=1),
            name=APP,
            route_prefix="/",
        )
        c = Cluster(f"http://127.0.0.1:{port}")
        pids = c.replica_pids
        yield c
    finally:
        # Remember every engine process so none outlives the test.
        for pid in list(pids):
            with contextlib.suppress(psutil.Error):
                pids.update(p.pid for p in psutil.Process(pid).children(recursive=True))
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            ray_constants.ENABLE_RAY_CLUSTER = cluster_mode
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        for pid in pids:
            with contextlib.suppress(psutil.Error):
                psutil.Process(pid).kill()
        if schema:
            import psycopg

            with psycopg.connect(postgres, autocommit=True) as conn:
                conn.execute(f"DROP SCHEMA {schema} CASCADE")


def _running_replicas() -> tuple[str, int]:
    from ray import serve

    status = serve.status().applications[APP].deployments["TenantloraEngine"]
    return str(status.status.value), int(status.replica_states.get("RUNNING", 0))


def test_multiplexed_routing_registration_and_replacement(cluster, adapter_dirs):
    import ray
    from ray import serve

    assert cluster.http.get("/health").status_code == 200
    # Same auth as tenantlora serve: no key, a bad key, a tenant's key.
    assert cluster.http.get("/v1/models").status_code == 401
    r = cluster.admin("POST", "/v1/tenants", json={"name": "acme"})
    assert r.status_code == 201, r.text
    key = r.json()["api_key"]
    bad = cluster.http.get("/v1/models", headers={"Authorization": "Bearer nope"})
    assert bad.status_code == 401 and bad.json()["error"]["code"] == "invalid_api_key"

    registered = {name: cluster.register("acme", name, adapter_dirs[name]) for name in "abcd"}
    models = cluster.http.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
    assert {m["id"] for m in models.json()["data"]} >= set("abcd")

    # 1. Repeated requests for one adapter stay on the replica that loaded it.
    first, text = cluster.chat(key, "a")
    served = {"a": first}
    for _ in range(4):
        time.sleep(STICKY_PAUSE)
        replica, again = cluster.chat(key, "a")
        assert replica == first, "adapter a moved to another replica"
        assert again == text  # greedy: the same adapter gives the same answer
    # Streaming passes through the gateway as a stream, from the same replica.
    with cluster.http.stream(
        "POST",
        "/v1/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={
            "model": "a",
            "messages": [{"role": "user", "content": "Name a colour."}],
            "max_tokens": 3,
            "temperature": 0,
            "stream": True,
        },
    ) as streamed:
        assert streamed.status_code == 200
        assert streamed.headers["content-type"].startswith("text/event-stream")
        assert streamed.headers[REPLICA] == first
        events = [line for line in streamed.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and len(events) >= 3
    time.sleep(STICKY_PAUSE)

    # 2. A different adapter goes to the replica with fewer adapters: the other one.
    for name in "bcd":
        served[name] = cluster.chat(key, name)[0]
        time.sleep(STICKY_PAUSE)
    assert served["b"] != served["a"]
    assert set(served.values()) == {served["a"], served["b"]}  # both replicas serve
    for name in "bcd":  # and each stays where it went
        assert cluster.chat(key, name)[0] == served[name]
    # 3. An adapter registered through one replica serves from the other (shared registry).
    crossed = [n for n in "abcd" if registered[n] != served[n]]
    extra = 0
    while not crossed and extra < 8:  # registration goes to any replica: try a few more
        name = f"extra{extra}"
        on = cluster.register("acme", name, adapter_dirs["a"])
        if cluster.chat(key, name)[0] != on:
            crossed.append(name)
        extra += 1
    assert crossed, f"registered on {registered}, served on {served}"

    # 4. Kill the replica serving `a` while requests run: it is replaced, and all succeed.
    victim = served["a"]
    results: list[tuple[str, str] | Exception] = []
    stop = threading.Event()

    def load() -> None:
        names = "abcd"
        i = 0
        while not stop.is_set() and i < 400:
            try:
                results.append(cluster.chat(key, names[i % 4]))
            except Exception as exc:  # noqa: BLE001 - recorded, asserted below
                results.append(exc)
            i += 1

    worker = threading.Thread(target=load)
    worker.start()
    time.sleep(3)
    actor = ray.get_actor(f"SERVE_REPLICA::{APP}#TenantloraEngine#{victim}", namespace="serve")
    ray.kill(actor, no_restart=True)
    killed_at = time.monotonic()
    while time.monotonic() - killed_at < 420:  # a new engine starts in about a minute
        time.sleep(5)
        state, running = _running_replicas()
        if state == "HEALTHY" and running == 2:
            break
    time.sleep(2)
    stop.set()
    worker.join(timeout=600)
    assert (state, running) == ("HEALTHY", 2), f"not replaced: {serve.status()}"
    errors = [r for r in results if isinstance(r, Exception)]
    assert not errors, f"{len(errors)} of {len(results)} requests failed: {errors[:3]}"
    assert len(results) >= 8 and all(rep != victim for rep, _ in results[-4:])

    # Afterwards the cluster still serves a newly registered adapter. (Which replica takes it is
    # Ray's choice: in two runs its router sent six new adapters in a row to the survivor rather
    # than to the replacement, so the test does not assert where it lands.)
    cluster.register("acme", "fresh", adapter_dirs["b"])
    assert cluster.chat(key, "fresh")[0] != victim

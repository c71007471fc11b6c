"""Session fixtures: the prepared base model, random adapters, and one real server.

The server is the real thing: `tenantlora serve` in a subprocess with the real vLLM CPU engine,
reached over HTTP. It starts once per test session (about 30-60 s) and is shared by every test
that needs it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from services import ensure_postgres, ensure_redis, ensure_s3  # noqa: E402
from support import make_random_adapters  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ADMIN_KEY = "test-admin-key-0123456789"
MODELS_DIR = Path(os.environ.get("TENANTLORA_TEST_MODELS", REPO / ".cache" / "models"))
STARTUP_TIMEOUT = 900


@pytest.fixture(scope="session")
def postgres_url():
    """A PostgreSQL server for the session (tests/services.py): the CI's, or one started here
    and stopped at the session's end."""
    service = ensure_postgres()
    yield service.url
    if service.stop is not None:
        service.stop()


@pytest.fixture(scope="session")
def redis_url():
    """A Redis server for the session (tests/services.py), like postgres_url."""
    service = ensure_redis()
    yield service.url
    if service.stop is not None:
        service.stop()


@pytest.fixture(scope="session")
def s3_server():
    """A local S3-compatible server (moto, tests/services.py) for the session, with credentials
    it checks."""
    service = ensure_s3()
    yield service
    service.stop()


# What the session server may fetch from S3 (tests/e2e/test_sources_s3.py).
S3_BUCKET = "tl-adapters"
S3_WATCH = f"watcher=s3://{S3_BUCKET}/watched/"


@pytest.fixture(scope="session")
def base_model_path() -> Path:
    from serving.base_model import prepare_embedded

    return prepare_embedded(MODELS_DIR)


@pytest.fixture(scope="session")
def adapter_dirs(base_model_path: Path, tmp_path_factory) -> dict[str, Path]:
    """Four random rank-8 adapters on all seven projections: a, b, c, d."""
    root = tmp_path_factory.mktemp("adapters")
    outs = {root / name: seed for seed, name in enumerate("abcd", start=11)}
    make_random_adapters(base_model_path, outs)
    return {p.name: p for p in outs}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`tenantlora serve` as a subprocess, restartable on the same data folder."""

    def __init__(self, data_dir: Path, base_model: Path, args: list[str], log_path: Path) -> None:
        self.data_dir = data_dir
        self.base_model = base_model
        self.args = args
        self.log_path = log_path
        self.port = _free_port()
        self.proc: subprocess.Popen | None = None
        self.base_model_name = base_model.name
        self.admin_key = ADMIN_KEY
        self.env: dict[str, str] = {}  # extra environment for the server

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def start(self) -> None:
        env = {
            **os.environ,
            "TENANTLORA_DATA_DIR": str(self.data_dir),
            "TENANTLORA_ADMIN_KEY": ADMIN_KEY,
            # `path=` registration is allowed under the session's temporary folders only
            "TENANTLORA_ADAPTER_ROOTS": json.dumps([str(self.data_dir.parent)]),
            **self.env,
        }
        cmd = [
            sys.executable, "-m", "serving.cli", "serve",
            "--port", str(self.port),
            "--base-model", str(self.base_model),
            *self.args,
        ]  # fmt: skip
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"server exited with {self.proc.returncode}; see {self.log_path}"
                )
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        self.stop()
        raise RuntimeError(f"server did not come up in {STARTUP_TIMEOUT} s; see {self.log_path}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def restart(self) -> None:
        self.stop()
        self.start()

    # ---- helpers for tests ---------------------------------------------------------------------

    def admin(self, method: str, path: str, **kwargs) -> httpx.Response:
        headers = {"Authorization": f"Bearer {ADMIN_KEY}", **kwargs.pop("headers", {})}
        return httpx.request(method, f"{self.url}{path}", headers=headers, timeout=120, **kwargs)

    def create_tenant(self, name: str, **quota) -> str:
        r = self.admin("POST", "/v1/tenants", json={"name": name, **quota})
        assert r.status_code == 201, r.text
        return r.json()["api_key"]

    def register_adapter(self, name: str, folder: Path, tenant: str | None = None) -> str:
        """Register a server-side PEFT folder (admin); return the model name to request."""
        data = {"name": name, "path": str(folder)}
        if tenant:
            data["tenant"] = tenant
        r = self.admin("POST", "/v1/adapters", data=data, files={"_": ("", b"")})
        assert r.status_code == 201, r.text
        return name

    def client(self, api_key: str):
        import openai

        return openai.OpenAI(base_url=self.base_url, api_key=api_key, max_retries=0, timeout=300)

    def async_client(self, api_key: str):
        import openai

        return openai.AsyncOpenAI(
            base_url=self.base_url, api_key=api_key, max_retries=0, timeout=300
        )


@pytest.fixture(scope="session")
def live_server(base_model_path, adapter_dirs, tmp_path_factory, s3_server):
    """One real server for the whole session: static adapters a and b; max_loras=2, so tests
    that use more adapters exercise vLLM's swapping; S3 sources on the session's S3 server."""
    data_dir = tmp_path_factory.mktemp("server-data")
    log_path = data_dir / "server.log"
    server = ServerProcess(
        data_dir,
        base_model_path,
        [
            "--lora", f"a={adapter_dirs['a']}",
            "--lora", f"b={adapter_dirs['b']}",
            "--max-loras", "2",
            "--max-cpu-loras", "3",
            "--max-lora-rank", "16",
            "--max-model-len", "1024",
            "--max-num-seqs", "32",
            "--kv-cache-gib", "1",
        ],
        log_path,
    )  # fmt: skip
    server.env.update(
        s3_server.server_env(
            allowed_prefixes=[f"s3://{S3_BUCKET}/{{tenant}}/"], watch=[S3_WATCH], watch_seconds=1
        )
    )
    server.start()
    yield server
    server.stop()
    if os.environ.get("CI"):
        sys.stderr.write(log_path.read_text(errors="replace")[-4000:])


@pytest.fixture(scope="session")
def tenant_key(live_server) -> str:
    """A tenant for the OpenAI API tests; it sees the public adapters a and b."""
    return live_server.create_tenant("apitester")

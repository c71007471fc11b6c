"""Servers the tests need, started by the test run itself, so `pytest tests` on a fresh machine
runs every test and skips none.

Each `ensure_<name>()` returns a `RunningService`: the URL of a server given by the environment
(`TENANTLORA_TEST_<NAME>_URL`, as `.ci/run` sets it), or of one it starts now, which `stop()`
then ends. tests/conftest.py wraps each in a session fixture that stops at the session's end what
the session started, and only that."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass
class RunningService:
    name: str
    url: str
    stop: Callable[[], None] | None = None  # None: not started by this test run

    @property
    def started_here(self) -> bool:
        return self.stop is not None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_postgres() -> RunningService:
    """TENANTLORA_TEST_POSTGRES_URL, else a private PostgreSQL started with `.ci/postgres.sh`
    (which installs it from Debian's packages when missing) in a fresh folder on a free port,
    so it never meets a server another test run or CI started."""
    url = os.environ.get("TENANTLORA_TEST_POSTGRES_URL")
    if url:
        return RunningService("postgresql", url)
    return _start_private("postgresql", "postgres.sh", "TENANTLORA_PG_ROOT", "TENANTLORA_PG_PORT")


def ensure_redis() -> RunningService:
    """TENANTLORA_TEST_REDIS_URL, else a private Redis started with `.ci/redis.sh` (which
    installs redis-server from Debian's packages when missing), like ensure_postgres."""
    url = os.environ.get("TENANTLORA_TEST_REDIS_URL")
    if url:
        return RunningService("redis", url)
    return _start_private("redis", "redis.sh", "TENANTLORA_REDIS_ROOT", "TENANTLORA_REDIS_PORT")


def _start_private(name: str, script_name: str, root_var: str, port_var: str) -> RunningService:
    """Run `.ci/<script_name>` with its own folder and a free port; it prints the URL last."""
    root = tempfile.mkdtemp(prefix=f"tenantlora-{name}-")
    env = dict(os.environ, **{root_var: root, port_var: str(free_port())})
    script = ["bash", str(REPO / ".ci" / script_name)]
    try:
        done = subprocess.run(
            script, env=env, capture_output=True, text=True, timeout=600, check=True
        )
    except subprocess.CalledProcessError as exc:
        shutil.rmtree(root, ignore_errors=True)
        raise RuntimeError(f"could not start {name} for the tests:\n{exc.stderr}") from exc

    def stop() -> None:
        subprocess.run([*script, "stop"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(root, ignore_errors=True)

    return RunningService(name, done.stdout.strip().splitlines()[-1], stop)


@dataclass
class S3Service(RunningService):
    """A local S3-compatible server (moto) that checks credentials: `access_key_id` /
    `secret_access_key` belong to an IAM user allowed every S3 action; any other key is refused
    (403), as a real object store would."""

    access_key_id: str = ""
    secret_access_key: str = ""
    region: str = "us-east-1"

    def client(self, secret: str | None = None):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.url,
            region_name=self.region,
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=secret or self.secret_access_key,
        )

    def server_env(self, **settings: object) -> dict[str, str]:
        """TENANTLORA_S3_* for a server that uses this store; `settings` add s3_* fields (lists
        and other non-strings as JSON)."""
        env = {
            "TENANTLORA_S3_ENDPOINT_URL": self.url,
            "TENANTLORA_S3_REGION": self.region,
            "TENANTLORA_S3_ACCESS_KEY_ID": self.access_key_id,
            "TENANTLORA_S3_SECRET_ACCESS_KEY": self.secret_access_key,
        }
        for key, value in settings.items():
            env[f"TENANTLORA_S3_{key.upper()}"] = (
                value if isinstance(value, str) else json.dumps(value)
            )
        return env


def ensure_s3() -> S3Service:
    """moto's S3 server in a thread of this process on a free port, with one IAM user whose
    key the tests use; authentication is enforced once the user exists."""
    import boto3
    import httpx
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    iam = boto3.client(
        "iam",
        endpoint_url=url,
        region_name="us-east-1",
        aws_access_key_id="bootstrap",
        aws_secret_access_key="bootstrap",
    )
    iam.create_user(UserName="tenantlora")
    key = iam.create_access_key(UserName="tenantlora")["AccessKey"]
    policy = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
    }
    arn = iam.create_policy(PolicyName="s3-all", PolicyDocument=json.dumps(policy))["Policy"]["Arn"]
    iam.attach_user_policy(UserName="tenantlora", PolicyArn=arn)
    httpx.post(f"{url}/moto-api/reset-auth", content=b"0").raise_for_status()
    return S3Service("s3", url, server.stop, key["AccessKeyId"], key["SecretAccessKey"])

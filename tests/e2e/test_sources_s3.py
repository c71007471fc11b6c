"""Issue 15 end to end: adapters from S3-compatible object storage.

Against the session's real server (vLLM CPU engine) and the session's local S3 server (moto,
which checks the server's credentials): registration by `uri=` (form and JSON) makes versions
that serve the weights stored in S3; bad objects, missing prefixes and buckets, prefixes outside
the allowed ones and objects the store denies get clear 4xx that never show the endpoint or the
credentials; a watched prefix's new folders become new versions, once each."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import httpx
import pytest
from conftest import S3_BUCKET, S3_WATCH

MSG = [{"role": "user", "content": "Name three fruits."}]
FILES = ("adapter_config.json", "adapter_model.safetensors")


@pytest.fixture(scope="module")
def s3(s3_server):
    client = s3_server.client()
    if S3_BUCKET not in [b["Name"] for b in client.list_buckets()["Buckets"]]:
        client.create_bucket(Bucket=S3_BUCKET)
    return client


def _put(client, prefix: str, folder: Path, **extra: bytes) -> str:
    for name in FILES:
        client.put_object(Bucket=S3_BUCKET, Key=prefix + name, Body=(folder / name).read_bytes())
    for name, data in extra.items():
        client.put_object(Bucket=S3_BUCKET, Key=prefix + name, Body=data)
    return f"s3://{S3_BUCKET}/{prefix}"


def _register(server, key: str, name: str, uri: str, as_json: bool = False) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"}
    if as_json:
        return httpx.post(
            f"{server.url}/v1/adapters",
            headers=headers,
            json={"name": name, "uri": uri},
            timeout=120,
        )
    return httpx.post(
        f"{server.url}/v1/adapters",
        headers=headers,
        data={"name": name, "uri": uri},
        files={"_": ("", b"")},
        timeout=120,
    )


def _answer(server, key: str, model: str) -> str:
    out = server.client(key).chat.completions.create(
        model=model, messages=MSG, temperature=0, max_tokens=12
    )
    return out.choices[0].message.content


def test_register_by_uri_and_version(live_server, s3, adapter_dirs):
    key = live_server.create_tenant("s3user")
    run = uuid.uuid4().hex[:6]
    first = _put(s3, f"s3user/{run}/support-v1/", adapter_dirs["a"], **{"README.md": b"# card"})
    second = _put(s3, f"s3user/{run}/support-v2/", adapter_dirs["b"])
    r1 = _register(live_server, key, "support", first)
    assert r1.status_code == 201, r1.text
    r2 = _register(live_server, key, "support", second.rstrip("/"), as_json=True)
    assert r2.status_code == 201, r2.text
    assert (r1.json()["id"], r2.json()["id"]) == ("support@1", "support@2")
    assert r1.json()["source"] == r2.json()["source"] == "s3"
    # the versions serve the weights stored in S3: the same answers as the static a and b
    assert _answer(live_server, key, "support@1") == _answer(live_server, key, "a")
    assert _answer(live_server, key, "support") == _answer(live_server, key, "b")


def test_refusals_are_clear_and_show_no_secrets(live_server, s3, s3_server, adapter_dirs):
    import boto3

    key = live_server.create_tenant("s3refused")
    run = uuid.uuid4().hex[:6]
    base = f"s3refused/{run}"
    extra = _put(s3, f"{base}/extra/", adapter_dirs["a"], **{"train.py": b"print()"})
    garbage = _put(s3, f"{base}/garbage/", adapter_dirs["a"])
    s3.put_object(
        Bucket=S3_BUCKET, Key=f"{base}/garbage/adapter_model.safetensors", Body=b"\0" * 64
    )
    denied = _put(s3, f"{base}/denied/", adapter_dirs["a"])
    _deny_reads(s3_server, boto3, f"arn:aws:s3:::{S3_BUCKET}/{base}/denied/*")
    other = _put(s3, f"s3user/{run}/theirs/", adapter_dirs["a"])
    cases = [
        (extra, 400, "unexpected_file"),
        (garbage, 400, "corrupt_weights"),
        (f"s3://{S3_BUCKET}/{base}/nothing-here", 404, "source_not_found"),
        ("s3://no-such-bucket/s3refused/x", 403, "source_not_allowed"),
        (other, 403, "source_not_allowed"),  # another tenant's prefix
        (denied, 403, "source_access_denied"),
        ("http://169.254.169.254/latest/meta-data", 400, "invalid_uri"),
        (f"file://{adapter_dirs['a']}", 403, "admin_required"),  # server folders: admin only
    ]
    for uri, status, code in cases:
        r = _register(live_server, key, "x", uri)
        assert (r.status_code, r.json()["error"]["code"]) == (status, code), (uri, r.text)
        for secret in (
            s3_server.url,
            s3_server.url.split("//")[1],
            s3_server.access_key_id,
            s3_server.secret_access_key,
        ):
            assert secret not in r.text
        assert str(adapter_dirs["a"]) not in r.text or code == "admin_required"
    listed = httpx.get(
        f"{live_server.url}/v1/adapters", headers={"Authorization": f"Bearer {key}"}
    ).json()["data"]
    assert [a["id"] for a in listed if a["owner"] != "public"] == []


def _deny_reads(s3_server, boto3, resource: str) -> None:
    """An IAM policy that denies the server's user GetObject on `resource` (moto checks it)."""
    httpx.post(f"{s3_server.url}/moto-api/reset-auth", content=b"inf").raise_for_status()
    try:
        iam = boto3.client(
            "iam",
            endpoint_url=s3_server.url,
            region_name="us-east-1",
            aws_access_key_id="admin",
            aws_secret_access_key="admin",
        )
        doc = {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Deny", "Action": "s3:GetObject", "Resource": resource}],
        }
        iam.put_user_policy(
            UserName="tenantlora", PolicyName="deny-e2e", PolicyDocument=json.dumps(doc)
        )
    finally:
        httpx.post(f"{s3_server.url}/moto-api/reset-auth", content=b"0").raise_for_status()


def _versions(server, key: str, name: str) -> list[str]:
    r = httpx.get(f"{server.url}/v1/adapters/{name}", headers={"Authorization": f"Bearer {key}"})
    return [v["id"] for v in r.json()["versions"]] if r.status_code == 200 else []


def _wait_for(server, key: str, name: str, count: int, timeout: float = 60) -> list[str]:
    """The adapter's versions once there are `count` of them (or whatever is there at timeout)."""
    deadline = time.monotonic() + timeout
    found = _versions(server, key, name)
    while len(found) < count and time.monotonic() < deadline:
        time.sleep(0.5)
        found = _versions(server, key, name)
    return found


def test_watched_prefix_registers_new_folders(live_server, s3, adapter_dirs):
    tenant, root = S3_WATCH.split("=")
    key = live_server.create_tenant(tenant)
    prefix = root.removeprefix(f"s3://{S3_BUCKET}/")
    _put(s3, f"{prefix}helper/v001/", adapter_dirs["c"])
    assert len(_wait_for(live_server, key, "helper", 1)) == 1
    assert _answer(live_server, key, "helper") is not None
    _put(s3, f"{prefix}helper/v002/", adapter_dirs["d"])
    assert len(_wait_for(live_server, key, "helper", 2)) == 2
    time.sleep(3)  # three more polls (every second) register nothing twice
    assert len(_versions(live_server, key, "helper")) == 2

"""Issue 13 end to end: no adapter, archive or race can hurt another tenant.

Against the session's real server (vLLM CPU engine): every adapter the server accepts is then
served; hostile archives are refused while /health stays fast and the server's memory stays
flat; a chunked body stops being read at the limit; quota and the concurrent-upload limit answer
before the body; concurrent same-bytes uploads, failures and purges never break a live adapter;
admin folder sources stay inside adapter_roots and never echo server paths."""

from __future__ import annotations

import asyncio
import bz2
import contextlib
import io
import json
import lzma
import os
import select
import socket
import tarfile
import threading
import time
import zipfile
from pathlib import Path

import httpx
import psutil
import pytest
from support import (
    ALL_PROJECTIONS,
    adapter_archive,
    adapter_files,
    declared_huge_member_tar_gz,
    gzip_bytes,
    long_name_bomb,
    make_random_adapters,
    many_members_tar_gz,
    patch_zip_member,
    tar_gz_bytes,
    upload_archive,
    zip_bytes,
    zip_with_huge_directory,
)

from serving.settings import Settings

MSG = [{"role": "user", "content": "Name a fruit."}]
MiB = 1 << 20
EVENT_LOOP_BUDGET_S = 0.1


def _error(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body["error"]) >= {"message", "type", "param", "code"}, body
    return body["error"]


def _serves(server, key: str, model: str) -> None:
    out = server.client(key).chat.completions.create(
        model=model, messages=MSG, temperature=0, max_tokens=3
    )
    assert out.choices[0].message.content is not None


def _with_config(folder: Path, **changes) -> bytes:
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(changes)
    return tar_gz_bytes(
        {
            "adapter_config.json": json.dumps(config).encode(),
            "adapter_model.safetensors": folder / "adapter_model.safetensors",
        }
    )


@pytest.fixture(scope="module")
def extra_adapters(base_model_path, tmp_path_factory) -> dict[str, Path]:
    """Adapters beyond the session's: q/v only; per-module ranks and alphas (rank_pattern /
    alpha_pattern with plain names); and fresh ones for the race rounds."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("upload-hardening")
    out = {"qv": root / "qv", **{f"race{i}": root / f"race{i}" for i in range(4)}}
    make_random_adapters(base_model_path, {out["qv"]: 101}, targets=["q_proj", "v_proj"])
    make_random_adapters(base_model_path, {out[f"race{i}"]: 200 + i for i in range(4)})
    model = AutoModelForCausalLM.from_pretrained(base_model_path, dtype=torch.float32)
    config = LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=ALL_PROJECTIONS,
        rank_pattern={"q_proj": 4, "model.layers.0.mlp.down_proj": 12},
        alpha_pattern={"v_proj": 32},
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    out["patterns"] = root / "patterns"
    peft_model.save_pretrained(out["patterns"], safe_serialization=True)
    return out


@pytest.fixture(scope="module")
def key(live_server) -> str:
    return live_server.create_tenant("hardening", max_adapters=50, max_bytes=2_000_000_000)


def test_every_accepted_adapter_is_served(live_server, key, adapter_dirs, extra_adapters):
    a = adapter_dirs["a"]
    accepted = {
        "plain": (adapter_archive(a), "adapter.tar.gz"),
        "zipped": (
            zip_bytes(
                {f"my-adapter/{k}": v for k, v in adapter_files(a, **{"README.md": b"hi"}).items()}
            ),
            "adapter.zip",
        ),
        "extras": (
            _with_config(
                adapter_dirs["b"],
                init_lora_weights="gaussian",
                use_rslora=True,
                lora_dropout=0.1,
                peft_version="0.21.2",
                layer_replication=None,
                lora_bias=False,
            ),
            "adapter.tar.gz",
        ),
        "qv-only": (adapter_archive(extra_adapters["qv"]), "adapter.tar.gz"),
        "patterns": (adapter_archive(extra_adapters["patterns"]), "adapter.tar.gz"),
    }
    for name, (data, filename) in accepted.items():
        response = upload_archive(live_server, key, name, data, filename)
        assert response.status_code == 201, (name, response.text)
        assert response.json()["source"] == "upload"
    for name in accepted:  # the rule: accepted means it loads in the engine
        _serves(live_server, key, name)


def test_hostile_configs_are_refused(live_server, key, adapter_dirs, tmp_path):
    from safetensors.torch import load_file, save_file

    a = adapter_dirs["a"]
    tensors = load_file(a / "adapter_model.safetensors")
    import torch

    tensors["base_model.model.model.embed_tokens.lora_A.weight"] = torch.zeros(8, 49152)
    tensors["base_model.model.model.embed_tokens.lora_B.weight"] = torch.zeros(576, 8)
    save_file(tensors, tmp_path / "embed.safetensors")
    infinite = (a / "adapter_config.json").read_text()
    infinite = json.dumps({**json.loads(infinite), "lora_alpha": 1}).replace(
        '"lora_alpha": 1', '"lora_alpha": Infinity'
    )
    cases = {
        "redos": (_with_config(a, alpha_pattern={"(?:.|.){0,20}[0-9]": 16}), "alpha_pattern"),
        "redos2": (_with_config(a, rank_pattern={"(.|.)*[0-9]": 8}), "rank_pattern"),
        "bias": (_with_config(a, lora_bias=True), "lora_bias"),
        "pissa": (_with_config(a, init_lora_weights="pissa"), "init_lora_weights"),
        "replication": (_with_config(a, layer_replication=[[0, 4]]), "layer_replication"),
        "unknown": (_with_config(a, vllm_lora_scaling_factor=1000.0), "vllm_lora_scaling_factor"),
        "inf": (
            tar_gz_bytes(
                {
                    "adapter_config.json": infinite.encode(),
                    "adapter_model.safetensors": a / "adapter_model.safetensors",
                }
            ),
            "Infinity",
        ),
        "embed": (
            tar_gz_bytes(
                {
                    "adapter_config.json": a / "adapter_config.json",
                    "adapter_model.safetensors": tmp_path / "embed.safetensors",
                }
            ),
            "embed_tokens",
        ),
    }
    for name, (data, named) in cases.items():
        response = upload_archive(live_server, key, f"bad-{name}", data)
        assert response.status_code == 400, (name, response.text)
        assert named in _error(response)["message"], (name, response.text)
    started = time.monotonic()
    _serves(live_server, key, "a")  # another adapter and the base model are not slowed
    _serves(live_server, key, live_server.base_model_name)
    assert time.monotonic() - started < 30


class _Watch:
    """Polls /health (event-loop latency) and samples the server tree's RSS in the background."""

    def __init__(self, server) -> None:
        self.url = f"{server.url}/health"
        self.proc = psutil.Process(server.proc.pid)
        self.latencies: list[float] = []
        self.peak_rss = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=f) for f in (self._health, self._rss)]

    def rss(self) -> int:
        procs = [self.proc, *self.proc.children(recursive=True)]
        total = 0
        for p in procs:
            with contextlib.suppress(psutil.Error):
                total += p.memory_info().rss
        return total

    def _health(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self._stop.is_set():
                started = time.perf_counter()
                assert client.get(self.url).status_code == 200
                self.latencies.append(time.perf_counter() - started)
                time.sleep(0.01)

    def _rss(self) -> None:
        while not self._stop.is_set():
            self.peak_rss = max(self.peak_rss, self.rss())
            time.sleep(0.01)

    def __enter__(self) -> _Watch:
        self.baseline = self.rss()
        for t in self._threads:
            t.start()
        time.sleep(0.2)
        return self

    def __exit__(self, *exc) -> None:
        time.sleep(0.2)
        self._stop.set()
        for t in self._threads:
            t.join()


def _hostile_archives(folder: Path) -> dict[str, tuple[bytes, int]]:
    good_zip = zip_bytes(adapter_files(folder))
    bad_crc = bytearray(good_zip)
    bad_crc[good_zip.find(b"adapter_model.safetensors") + 200] ^= 0xFF
    good_tar = adapter_archive(folder)
    plain = io.BytesIO()
    with tarfile.open(fileobj=plain, mode="w") as tf:
        tf.add(folder / "adapter_config.json", arcname="adapter_config.json")
    dup = io.BytesIO()
    with zipfile.ZipFile(dup, "w") as zf:
        for content in (b"{}", b"{ }"):
            zf.writestr("adapter_config.json", content)
    return {
        "long-name-tar": (long_name_bomb(), 400),
        "long-name-tgz": (gzip_bytes(long_name_bomb()), 400),
        "200k-members": (many_members_tar_gz(), 400),
        "4GiB-member": (declared_huge_member_tar_gz(), 413),
        "zip-directory": (zip_with_huge_directory(), 400),
        "bz2": (bz2.compress(plain.getvalue()), 400),
        "xz": (lzma.compress(plain.getvalue()), 400),
        "plain-tar": (plain.getvalue(), 400),
        "truncated-gzip": (good_tar[: len(good_tar) // 2], 400),
        "bad-crc": (bytes(bad_crc), 400),
        "encrypted": (patch_zip_member(good_zip, "adapter_model.safetensors", flag_bits=1), 400),
        "method-99": (patch_zip_member(good_zip, "adapter_model.safetensors", method=99), 400),
        "duplicates": (dup.getvalue(), 400),
    }


def test_hostile_archives_cost_no_memory_and_no_event_loop_time(live_server, key, adapter_dirs):
    """Worst /health latency during each upload stays within 100 ms of the worst while idle
    (the machine is shared: the idle worst is scheduling noise, not the event loop)."""
    with _Watch(live_server) as idle:
        time.sleep(2)
    idle_worst = max(idle.latencies)
    report = {"idle": (0, 0.0, idle_worst, idle.peak_rss - idle.baseline)}
    with pytest.warns(UserWarning):  # zipfile warns about the duplicate name it writes
        hostile = _hostile_archives(adapter_dirs["a"])
    for name, (data, status) in hostile.items():
        with _Watch(live_server) as watch:
            started = time.perf_counter()
            response = upload_archive(live_server, key, f"h-{name}", data)
            seconds = time.perf_counter() - started
        assert response.status_code == status, (name, response.text)
        code = _error(response)["code"]
        assert code in ("invalid_archive", "unsafe_archive", "adapter_too_large"), (name, code)
        grew = watch.peak_rss - watch.baseline
        report[name] = (len(data), seconds, max(watch.latencies), grew)
        assert seconds < 5, report[name]
        assert grew < len(data) + 8 * MiB, (name, report[name])
        assert max(watch.latencies) < idle_worst + EVENT_LOOP_BUDGET_S, (name, report[name])
    print("\nname: upload bytes, seconds, worst /health s, RSS growth bytes")
    for name, row in report.items():
        print(f"{name}: {row}")


def _raw_upload(server, key: str, *, body_prefix: bytes = b"") -> socket.socket:
    """Start a chunked multipart upload over a raw socket: headers, then `body_prefix`."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    head = (
        "POST /v1/adapters HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{server.port}\r\n"
        f"Authorization: Bearer {key}\r\n"
        "Content-Type: multipart/form-data; boundary=XyZ\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    ).encode()
    sock.sendall(head)
    if body_prefix:
        sock.sendall(b"%x\r\n%s\r\n" % (len(body_prefix), body_prefix))
    return sock


def _read_response(sock: socket.socket, timeout: float = 30) -> tuple[int, dict]:
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length")
    )
    while len(rest) < length:
        rest += sock.recv(65536)
    return status, json.loads(rest[:length])


_FORM_START = (
    b'--XyZ\r\nContent-Disposition: form-data; name="name"\r\n\r\nbig\r\n'
    b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="a.tgz"\r\n'
    b"Content-Type: application/octet-stream\r\n\r\n"
)


def test_chunked_body_stops_being_read_at_the_limit(live_server, key):
    limit = 256 * MiB  # the server's max_adapter_bytes (default)
    sock = _raw_upload(live_server, key, body_prefix=_FORM_START)
    chunk = b"%x\r\n%s\r\n" % (MiB, b"\0" * MiB)
    sent = 0
    with sock:
        while sent < 2 * limit:
            readable, _, _ = select.select([sock], [], [], 0)
            if readable:
                break
            try:
                sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += MiB
        status, body = _read_response(sock)
    assert status == 413 and body["error"]["code"] == "adapter_too_large", body
    assert sent < limit + 64 * MiB, sent  # the server stopped reading near the limit


def test_quota_and_concurrency_limits_answer_before_the_body(live_server, adapter_dirs):
    full = live_server.create_tenant("at-quota", max_adapters=1)
    assert (
        upload_archive(live_server, full, "only", adapter_archive(adapter_dirs["a"])).status_code
        == 201
    )
    with _raw_upload(live_server, full) as sock:  # headers only: no body at all
        status, body = _read_response(sock, timeout=10)
    assert status == 403 and body["error"]["code"] == "quota_exceeded", body

    busy = live_server.create_tenant("busy-uploader")
    slots = Settings().max_concurrent_uploads  # the session server runs the default
    held = [_raw_upload(live_server, busy, body_prefix=_FORM_START) for _ in range(slots)]
    try:
        time.sleep(0.5)
        response = upload_archive(live_server, busy, "third", adapter_archive(adapter_dirs["a"]))
        assert response.status_code == 429, response.text
        assert _error(response)["code"] == "too_many_uploads"
        assert response.headers["retry-after"]
        other = live_server.create_tenant("not-busy")  # other tenants are not held up
        assert (
            upload_archive(live_server, other, "x", adapter_archive(adapter_dirs["a"])).status_code
            == 201
        )
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.5)
    assert (
        upload_archive(live_server, busy, "later", adapter_archive(adapter_dirs["a"])).status_code
        == 201
    )


def test_same_bytes_from_two_tenants_with_failures_and_purges(live_server, extra_adapters):
    """The dedup race: a registration that fails after its files are stored, and a purge of
    the same content, run beside another tenant's registration of the same bytes."""

    async def round_(i: int, ok: str, failing: str, purger: str) -> list[httpx.Response]:
        data = adapter_archive(extra_adapters[f"race{i}"])
        async with httpx.AsyncClient(base_url=live_server.base_url, timeout=300) as http:
            first = await http.post(
                "/adapters",
                headers={"Authorization": f"Bearer {purger}"},
                data={"name": f"r{i}"},
                files={"file": ("a.tgz", data)},
            )
            assert first.status_code == 201, first.text

            def up(k: str) -> asyncio.Future:
                return http.post(
                    "/adapters",
                    headers={"Authorization": f"Bearer {k}"},
                    data={"name": f"r{i}"},
                    files={"file": ("a.tgz", data)},
                )

            delete = http.delete(f"/adapters/r{i}", headers={"Authorization": f"Bearer {purger}"})
            return await asyncio.gather(up(ok), up(failing), delete)

    ok = live_server.create_tenant("race-ok")
    failing = live_server.create_tenant("race-small", max_bytes=1_000_000)  # fails at its row
    purger = live_server.create_tenant("race-purger")
    for i in range(4):
        good, bad, deleted = asyncio.run(round_(i, ok, failing, purger))
        assert good.status_code == 201, good.text
        assert bad.status_code == 403 and _error(bad)["code"] == "quota_exceeded", bad.text
        assert deleted.status_code == 200, deleted.text
        time.sleep(1)  # the purge runs once the deleted version's requests are done
        _serves(live_server, ok, f"r{i}")
        stored = Path(live_server.data_dir) / "adapters"
        assert any(p.name == good.json()["sha256"] for p in stored.glob("*/*"))


def test_admin_folder_sources_stay_inside_roots(live_server, key, adapter_dirs, tmp_path):
    def register(path: str):
        return live_server.admin(
            "POST", "/v1/adapters", data={"name": "srv", "path": path}, files={"_": ("", b"")}
        )

    outside = register("/etc")
    assert outside.status_code == 403 and "/etc" not in outside.text, outside.text
    (tmp_path / "escape").symlink_to("/etc")  # tmp_path is inside the allowed root
    escaped = register(str(tmp_path / "escape"))
    assert escaped.status_code == 403 and "/etc" not in escaped.text, escaped.text
    fifo_dir = tmp_path / "fifo"
    fifo_dir.mkdir()
    (fifo_dir / "adapter_config.json").write_bytes(
        (adapter_dirs["a"] / "adapter_config.json").read_bytes()
    )
    os.mkfifo(fifo_dir / "adapter_model.safetensors")
    (fifo_dir / "private-notes.txt").write_text("x")
    fifo = register(str(fifo_dir))
    assert fifo.status_code == 400, fifo.text
    assert str(tmp_path) not in fifo.text and "private-notes" not in fifo.text
    ok = register(str(adapter_dirs["c"]))
    assert ok.status_code == 201 and ok.json()["source"] == "folder", ok.text
    static = httpx.get(
        f"{live_server.base_url}/adapters/a", headers={"Authorization": f"Bearer {key}"}
    )
    assert static.json()["source"] == "static", static.text
    assert str(adapter_dirs["a"]) not in static.text

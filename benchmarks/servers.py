"""Benchmark servers as subprocesses: start, wait until ready, measure memory, stop.

Every server runs in its own process group (its own session) on 127.0.0.1 and a free port; stop()
ends exactly that group. Memory is the sum over the whole process tree (API server, engine core,
workers): RSS (counts shared libraries in every process) and USS (pages only that tree owns, the
marginal cost of one more such process tree).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

from benchmarks.records import Memory

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_memory(pid: int) -> Memory:
    """RSS and USS (bytes) summed over ``pid`` and all its descendants."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return Memory(0, 0, 0)
    rss = uss = n = 0
    for p in procs:
        try:
            info = p.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        rss += info.rss
        uss += getattr(info, "uss", info.rss)
        n += 1
    return Memory(rss, uss, n)


def gpu_memory() -> int | None:
    """Used GPU memory in bytes (all GPUs, via nvidia-smi), or None without a GPU."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return sum(int(x) for x in out.split()) * 1024 * 1024


def scrape_metrics(root_url: str) -> dict[str, float]:
    """Prometheus text from ``/metrics``, summed over label sets: name -> value."""
    try:
        text = httpx.get(root_url + "/metrics", timeout=10, trust_env=False).text
    except httpx.HTTPError:
        return {}
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_part, _, value = line.rpartition(" ")
        name = name_part.split("{", 1)[0]
        try:
            values[name] = values.get(name, 0.0) + float(value)
        except ValueError:
            continue
    return values


def bench_dtype() -> str:
    """The one dtype every server in a benchmark run uses: what `tenantlora serve` picks by
    default on this machine (serving.hardware.resolve_dtype), so the comparison is like for like."""
    from serving.engine import on_gpu
    from serving.hardware import resolve_dtype

    return resolve_dtype("auto", on_gpu())


@dataclass
class Server:
    """One server process tree. ``base_model_name`` is the `model` value that means no adapter."""

    name: str
    cmd: list[str]
    port: int
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    base_model_name: str = ""
    health_path: str = "/health"  # llama.cpp's Python server has none: its /v1/models then
    proc: subprocess.Popen[bytes] | None = None
    spawned_at: float = 0.0
    ready_s: float | None = None

    @property
    def root_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return self.root_url + "/v1"

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log.info("starting %s on port %d (log %s)", self.name, self.port, self.log_path)
        env = {**os.environ, **self.env}
        with open(self.log_path, "wb") as logf:
            self.spawned_at = time.perf_counter()
            self.proc = subprocess.Popen(
                self.cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )

    def wait_ready(self, timeout: float = 600.0) -> float:
        """Block until /health answers 200 and /v1/models lists a model; returns seconds since
        spawn (the cold start up to ready)."""
        assert self.proc is not None
        deadline = self.spawned_at + timeout
        with httpx.Client(timeout=5, trust_env=False) as client:
            while time.perf_counter() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"{self.name} exited ({self.proc.returncode}): {self.tail()}"
                    )
                try:
                    if client.get(self.root_url + self.health_path).status_code == 200:
                        listing = client.get(self.base_url + "/models")
                        # A server that needs a key (401) is up; its base name is known already.
                        closed = listing.status_code == 401 and self.base_model_name
                        models = ["closed"] if closed else listing.json()["data"]
                        if models:
                            self.ready_s = time.perf_counter() - self.spawned_at
                            if not self.base_model_name:
                                self.base_model_name = models[0]["id"]
                            log.info("%s ready in %.1fs", self.name, self.ready_s)
                            return self.ready_s
                except (httpx.HTTPError, ValueError, KeyError):
                    pass
                time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"{self.name} not ready after {timeout:.0f}s: {self.tail()}")

    def memory(self) -> Memory:
        assert self.proc is not None
        return tree_memory(self.proc.pid)

    def tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self, grace: float = 20.0) -> None:
        """End this server's own process group: SIGTERM, then SIGKILL after ``grace``."""
        if self.proc is None or self.proc.poll() is not None:
            return
        pgid = os.getpgid(self.proc.pid)
        os.killpg(pgid, signal.SIGTERM)
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(pgid, signal.SIGKILL)
            self.proc.wait(10)
        # Workers may outlive the leader for a moment; end what is left of the group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        log.info("stopped %s", self.name)


def create_tenant_key(server: Server, name: str) -> str:
    """Create a tenant on a tenantlora server started with TENANTLORA_ADMIN_KEY in its env;
    return the tenant's API key."""
    response = httpx.post(
        server.base_url + "/tenants",
        headers={"Authorization": f"Bearer {server.env['TENANTLORA_ADMIN_KEY']}"},
        json={"name": name},
        timeout=60,
        trust_env=False,
    )
    response.raise_for_status()
    return response.json()["api_key"]


def tenantlora_server(
    name: str,
    base_model: str,
    loras: dict[str, Path],
    log_dir: Path,
    data_dir: Path,
    max_loras: int,
    max_cpu_loras: int,
    max_model_len: int,
    kv_cache_gib: float,
    cpu_lora_ops: bool | None = None,
    enforce_eager: bool = False,
    lora_dtype: str = "auto",
) -> Server:
    """`tenantlora serve` (our server) with static adapters."""
    port = free_port()
    cmd = [sys.executable, "-m", "serving.cli", "serve", "--base-model", base_model]
    cmd += ["--port", str(port), "--data-dir", str(data_dir), "--served-model-name", "base"]
    cmd += ["--dtype", bench_dtype()]
    cmd += ["--max-loras", str(max_loras), "--max-cpu-loras", str(max_cpu_loras)]
    cmd += ["--max-model-len", str(max_model_len), "--kv-cache-gib", str(kv_cache_gib)]
    cmd += ["--lora-dtype", lora_dtype]
    for lname, path in loras.items():
        cmd += ["--lora", f"{lname}={path}"]
    if enforce_eager:
        cmd.append("--enforce-eager")
    env = {}
    if cpu_lora_ops is not None:
        env["TENANTLORA_CPU_LORA_OPS"] = "1" if cpu_lora_ops else "0"
        cmd.append("--cpu-lora-ops" if cpu_lora_ops else "--no-cpu-lora-ops")
    return Server(name, cmd, port, log_dir / f"{name}.log", env, base_model_name="base")


def vllm_server(
    name: str,
    model: str,
    loras: dict[str, Path],
    log_dir: Path,
    max_loras: int,
    max_cpu_loras: int,
    max_model_len: int,
    kv_cache_gib: float,
    enforce_eager: bool = False,
    lora_dtype: str = "auto",
) -> Server:
    """vLLM's own OpenAI server; with adapters it enables LoRA, without them it is a plain engine.
    Its engine threads are bound as ours are (serving.engine.cpu_thread_binding), so both use the
    same cores."""
    port = free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model]
    cmd += ["--served-model-name", "base", "--port", str(port), "--host", "127.0.0.1"]
    cmd += ["--max-model-len", str(max_model_len), "--dtype", bench_dtype()]
    cmd += ["--kv-cache-memory-bytes", str(int(kv_cache_gib * 1024**3))]
    if enforce_eager:
        cmd.append("--enforce-eager")
    if loras:
        cmd += ["--enable-lora", "--max-lora-rank", "16", "--max-loras", str(max_loras)]
        cmd += ["--max-cpu-loras", str(max(max_cpu_loras, max_loras)), "--lora-dtype", lora_dtype]
        cmd += ["--lora-modules"]
        cmd += [f"{n}={p}" for n, p in loras.items()]
    return Server(name, cmd, port, log_dir / f"{name}.log", engine_thread_env(), "base")


def engine_thread_env() -> dict[str, str]:
    """The CPU thread binding `tenantlora serve` gives its engine by default, for vLLM's server."""
    from serving.engine import cpu_thread_binding, on_gpu
    from serving.settings import Settings

    if "VLLM_CPU_OMP_THREADS_BIND" in os.environ or on_gpu():
        return {}
    binding = cpu_thread_binding(Settings())
    return {} if binding is None else {"VLLM_CPU_OMP_THREADS_BIND": binding}


def peft_server(
    name: str, base_model: str, loras: dict[str, Path], log_dir: Path, threads: int
) -> Server:
    """The transformers + PEFT peer (`tenantlora bench peft-server`, benchmarks.peft_server)."""
    port = free_port()
    cmd = [sys.executable, "-m", "serving.cli", "bench", "peft-server", "--base-model", base_model]
    cmd += ["--port", str(port), "--threads", str(threads), "--served-model-name", "base"]
    cmd += ["--dtype", bench_dtype()]
    for lname, path in loras.items():
        cmd += ["--lora", f"{lname}={path}"]
    return Server(name, cmd, port, log_dir / f"{name}.log", base_model_name="base")


def llamacpp_server(name: str, python: str, gguf: Path, log_dir: Path, threads: int) -> Server:
    """llama.cpp's OpenAI-compatible server (`llama-cpp-python`'s `llama_cpp.server`) on one GGUF
    file. It runs one request at a time; the others wait in its queue."""
    port = free_port()
    cmd = [python, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", "base"]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048"]
    cmd += ["--n_threads", str(threads), "--n_threads_batch", str(threads), "--verbose", "False"]
    # By default it cancels the running request when another arrives; queue them instead.
    cmd += ["--interrupt_requests", "False"]
    return Server(
        name, cmd, port, log_dir / f"{name}.log", base_model_name="base", health_path="/v1/models"
    )


def find_llama_cpp_python(explicit: str | None) -> str | None:
    """A Python that can import llama_cpp.server: the one given, this one, or
    $TENANTLORA_LLAMA_CPP_PYTHON. llama-cpp-python compiles llama.cpp at install (about 5 min on
    2 cores), so it is not a dependency of the project; see the README's benchmark section."""
    candidates = [explicit, os.environ.get("TENANTLORA_LLAMA_CPP_PYTHON"), sys.executable]
    for python in [c for c in candidates if c]:
        try:
            ok = (
                subprocess.run(
                    [python, "-c", "import llama_cpp.server"], capture_output=True, timeout=60
                ).returncode
                == 0
            )
        except (OSError, subprocess.SubprocessError):
            ok = False
        if ok:
            return python
    return None

"""The engine's CPU thread binding (serving.engine.cpu_thread_binding): all cores on small hosts,
vLLM's own binding on big ones, the setting wins, and an operator's VLLM_CPU_OMP_THREADS_BIND is
left alone."""

from __future__ import annotations

import pytest

from serving import engine
from serving.settings import Settings


@pytest.mark.parametrize(
    ("cores", "threads", "expected"),
    [
        ({0, 1}, None, "0,1"),  # 2 cores: both (vLLM's auto would leave the engine one)
        ({2, 3, 5}, None, "2,3,5"),  # the CPUs this process may use, not 0..n-1
        (set(range(16)), None, None),  # big host: vLLM's own binding
        (set(range(16)), 4, "0,1,2,3"),  # the setting wins
        ({0, 1}, 1, "0"),
    ],
)
def test_binding(monkeypatch, cores, threads, expected) -> None:
    monkeypatch.setattr(engine.os, "sched_getaffinity", lambda _pid: cores)
    assert engine.cpu_thread_binding(Settings(cpu_threads=threads)) == expected


def test_operator_binding_is_kept(monkeypatch) -> None:
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "1")
    monkeypatch.setattr(engine, "on_gpu", lambda: False)
    engine.apply_cpu_thread_binding(Settings(cpu_threads=2))
    assert engine.os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "1"


def test_binding_is_set_for_the_engine(monkeypatch) -> None:
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.setattr(engine, "on_gpu", lambda: False)
    monkeypatch.setattr(engine.os, "sched_getaffinity", lambda _pid: {0, 1})
    engine.apply_cpu_thread_binding(Settings())
    assert engine.os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "0,1"
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND")


def test_cpu_max_loras_default() -> None:
    assert Settings().effective_max_loras(gpu=False) == 32
    assert Settings().effective_max_loras(gpu=True) == 4
    assert Settings(max_loras=2).effective_max_loras(gpu=False) == 2
    assert Settings(max_cpu_loras=8).adapter_cache_size(gpu=False) == 32


def test_cpu_engine_runs_the_model_in_process() -> None:
    """On a CPU the engine core runs the model itself (vLLM's uni-process executor, given as a
    class so vLLM's CPU platform keeps it); --cpu-worker-process and a GPU keep vLLM's choice."""
    from vllm.v1.executor.uniproc_executor import UniProcExecutor

    cpu = engine.engine_kwargs(Settings(), "model", gpu=False)
    assert cpu["distributed_executor_backend"] is UniProcExecutor
    worker = engine.engine_kwargs(Settings(cpu_worker_process=True), "model", gpu=False)
    assert "distributed_executor_backend" not in worker
    assert "distributed_executor_backend" not in engine.engine_kwargs(Settings(), "m", gpu=True)


def test_cpu_worker_process_from_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("TENANTLORA_CPU_WORKER_PROCESS", "true")
    assert Settings().cpu_worker_process is True


def test_bad_lora_dtype_is_refused(monkeypatch) -> None:
    """A LoRA dtype vLLM would refuse (float32) or a typo fails at start-up, naming the choices."""
    from pydantic import ValidationError

    for value in ("float32", "bf16", ""):
        monkeypatch.setenv("TENANTLORA_LORA_DTYPE", value)
        with pytest.raises(ValidationError, match="auto"):
            Settings()

"""Every place tenantlora reaches into vLLM beyond its public API, and the versions it is known to
work with.

- `serving.vllm_compat.serving`: vLLM's OpenAI serving classes with the adapter taken from our
  tenant resolver (overrides `_check_model` and `_maybe_get_adapters`; chat, completion and
  tokenization);
- `serving.vllm_compat.patches`: the no-adapter fix for vLLM's CPU LoRA ops (a general plugin);
- `serving.cpu_lora`: the grouped CPU LoRA ops plugin (punica wrapper selection, `from_layer`);
- `in_process_executor()`: the model run in the engine-core process on a CPU (see its docstring).

`check_vllm()` runs at server start and refuses an untested vLLM with a clear message: the
overridden internals change between vLLM releases without notice. The `cpu`/`gpu` extras in
pyproject.toml pin the same versions."""

from __future__ import annotations

import os

SUPPORTED_VLLM_VERSIONS: tuple[str, ...] = ("0.32.0",)
OVERRIDE_ENV = "TENANTLORA_ALLOW_UNTESTED_VLLM"

# (module, attribute path) of every vLLM internal tenantlora overrides or patches.
INTERNALS: tuple[tuple[str, str], ...] = (
    ("vllm.entrypoints.serve.engine.serving", "BaseServing._check_model"),
    ("vllm.entrypoints.serve.engine.serving", "BaseServing._maybe_get_adapters"),
    ("vllm.entrypoints.openai.models.serving", "OpenAIServingModels.model_name"),
    ("vllm.entrypoints.serve.tokenize.serving", "ServingTokenization._maybe_get_adapters"),
    ("vllm.lora.ops.torch_ops.lora_ops", "bgmv_shrink"),
    ("vllm.lora.punica_wrapper.punica_cpu", "bgmv_shrink"),
    ("vllm.lora.utils", "from_layer"),
    ("vllm.lora.model_manager", "from_layer"),
    ("vllm.platforms.interface", "Platform.get_punica_wrapper"),
    ("vllm.v1.executor.uniproc_executor", "UniProcExecutor"),
)


class UnsupportedVLLM(RuntimeError):
    pass


def installed_vllm_version() -> str:
    import vllm

    return vllm.__version__


def vllm_supported(version: str | None = None) -> bool:
    return (version or installed_vllm_version()) in SUPPORTED_VLLM_VERSIONS


def missing_internals() -> list[str]:
    """The overridden internals the installed vLLM no longer has."""
    import importlib

    missing = []
    for module_name, path in INTERNALS:
        try:
            obj = importlib.import_module(module_name)
            for part in path.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError):
            missing.append(f"{module_name}.{path}")
    return missing


def in_process_executor() -> type:
    """vLLM's uni-process executor, given as a class: the engine-core process runs the model.

    vLLM's CPU platform turns the name "uni" into its multiprocess executor (a worker process
    beside the engine core), and the engine core then busy-waits (sched_yield) for each step's
    result. On a small host that spinning thread shares the cores with the compute threads:
    one request alone ran at 65-72 ms a token with it and 38-46 ms without it (2-core AVX2
    EPYC, SmolLM2-135M float32, LoRA on, through the server). Given as a class, the choice is
    kept. The engine core is spawned after vLLM's CPU platform set its environment
    (libgomp/tcmalloc preload, thread binding), so it inherits what the worker would get."""
    from vllm.v1.executor.uniproc_executor import UniProcExecutor

    return UniProcExecutor


def check_vllm() -> None:
    """Fail loudly on a vLLM outside the tested range (override: TENANTLORA_ALLOW_UNTESTED_VLLM=1,
    which still refuses a vLLM that lacks an overridden internal)."""
    version = installed_vllm_version()
    missing = missing_internals()
    if missing:
        raise UnsupportedVLLM(
            f"tenantlora needs vLLM {' or '.join(SUPPORTED_VLLM_VERSIONS)}; the installed vLLM "
            f"{version} lacks internals tenantlora overrides: {', '.join(missing)}"
        )
    if vllm_supported(version):
        return
    if os.environ.get(OVERRIDE_ENV, "").strip() in ("1", "true", "yes"):
        return
    raise UnsupportedVLLM(
        f"tenantlora is tested with vLLM {' or '.join(SUPPORTED_VLLM_VERSIONS)}, found {version}. "
        f"Install a supported version (pip install -e '.[cpu]' or '.[gpu]'), or set "
        f"{OVERRIDE_ENV}=1 to try this one at your own risk."
    )

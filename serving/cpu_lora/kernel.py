"""The fused CPU LoRA kernel (lora_kernel.cpp): built with the system C++ compiler on first use,
cached per source and CPU, loaded with ctypes.

Why C++: with many adapters in one engine step, PyTorch's grouped GEMM runs one tiny GEMM per
adapter and layer (shrink, then expand, plus a gather and a scatter of the rows), which profiled
at 65 % of a 32-adapter step. The kernel does shrink and expand of every group in one call and
reads each adapter's weights once, in the model's dtype (bf16 weights are half the bytes of the
float32 copies the torch path keeps).

No torch headers, so the build takes seconds; the OpenMP runtime is torch's own libgomp.so.1,
already loaded in the process. When no compiler is found or the build fails, ``load()`` returns
None and the plugin keeps the torch path (one warning line).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from serving.hardware import cpu_capabilities, cpu_model_name

logger = logging.getLogger("vllm.tenantlora.cpu_lora")

SOURCE = Path(__file__).with_name("lora_kernel.cpp")
ABI_VERSION = 2
CACHE_ENV = "TENANTLORA_KERNEL_CACHE"
DTYPES = (torch.bfloat16, torch.float32)
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]


def cache_dir() -> Path:
    base = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "tenantlora", "kernels"
    )
    return Path(base)


def library_path() -> Path:
    """Where the built library for this source, compiler flags and CPU (-march=native) lives."""
    isa = sorted(k for k, on in cpu_capabilities().items() if on)
    cpu = " ".join([cpu_model_name(), *isa, *FLAGS])
    key = hashlib.sha256(SOURCE.read_bytes() + cpu.encode())
    return cache_dir() / f"lora_kernel-{key.hexdigest()[:16]}.so"


def build(dest: Path) -> None:
    """Compile the kernel to ``dest`` (atomically: a temp file renamed into place)."""
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        raise RuntimeError("no C++ compiler (g++) on PATH")
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=dest.parent)
    os.close(fd)
    try:
        cmd = [cxx, *FLAGS, str(SOURCE), "-o", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"compile failed: {done.stderr.strip()[-500:]}")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.cache
def load() -> ctypes.CDLL | None:
    """The kernel library, built if needed; None (with a warning) when it cannot be had."""
    try:
        path = library_path()
        if not path.exists():
            build(path)
        lib = ctypes.CDLL(str(path))
        if lib.tl_lora_abi_version() != ABI_VERSION:
            raise RuntimeError("stale library")
    except Exception as exc:  # noqa: BLE001 - any failure means: keep the torch path
        logger.warning("tenantlora CPU LoRA kernel unavailable (%s); using torch ops", exc)
        return None
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    argtypes = [p, i64, p, i64, p, p, i64, i64, i64, p, i64, p, i64, p, p, ctypes.c_float]
    for name in ("tl_lora_linear_bf16", "tl_lora_linear_f32", "tl_lora_linear_f32_bf16w"):
        fn = getattr(lib, name)
        fn.argtypes = argtypes
        fn.restype = None
    return lib


class LayerCall:
    """One LoRA layer's kernel call with its constant arguments bound once: the weight storage is
    allocated once when the plugin stacks the layer and never moves (vLLM writes adapters into
    it), so its pointers and shapes are fixed. Per call only x, y and the step's grouping change;
    binding the rest takes about 10 us of Python off each of the ~120 layer calls of a step.

    a: (S, K, R) and b: (S, r, N), contiguous, same dtype (bf16 or float32); cols: (n_slices + 1,)
    int64 column bounds of the slices in b. x and y are in the weights' dtype, or float32 with
    bf16 weights (vLLM's ``--lora-dtype bfloat16`` on a float32 model: half the bytes to read).
    """

    __slots__ = ("a", "b", "cols", "slots", "k", "n", "_fns", "_const")

    def __init__(self, a: torch.Tensor, b: torch.Tensor, cols: torch.Tensor):
        lib = load()
        if lib is None:
            raise RuntimeError("the CPU LoRA kernel is not available")
        self.a, self.b, self.cols = a, b, cols  # keep the storage alive
        self.slots, self.k, self.n = a.shape[0], a.shape[1], b.shape[2]
        self._fns = (  # by the activations' dtype
            {torch.bfloat16: lib.tl_lora_linear_bf16, torch.float32: lib.tl_lora_linear_f32_bf16w}
            if a.dtype == torch.bfloat16
            else {torch.float32: lib.tl_lora_linear_f32}
        )
        self._const = (a.data_ptr(), b.data_ptr(), self.k, b.shape[1], cols.numel() - 1,
                       cols.data_ptr(), self.n)  # fmt: skip

    def fits(self, y: torch.Tensor, x: torch.Tensor, num_tokens: int, max_slot: int) -> bool:
        """Whether (T, N) y and (T, K) x are what this layer's kernel call reads (the kernel
        trusts its arguments, so every call is checked here first)."""
        return (
            x.dtype in self._fns
            and y.dtype is x.dtype
            and x.dim() == 2
            and y.dim() == 2
            and x.stride(1) == 1
            and y.stride(1) == 1
            and x.shape[1] == self.k
            and y.shape[1] == self.n
            and x.shape[0] == y.shape[0] == num_tokens
            and max_slot < self.slots
        )

    def __call__(self, y: torch.Tensor, x: torch.Tensor, groups: tuple, scale: float) -> None:
        """y[t] += LoRA delta of every grouped row t, in place; ``groups`` is
        ``group_args(rows, slots, ends)`` of the step. Call ``fits`` first."""
        fn = self._fns[x.dtype]
        fn(x.data_ptr(), x.stride(0), y.data_ptr(), y.stride(0), *self._const, *groups, scale)


def bind(a_stacked, b_stacked) -> None:
    """Attach to a layer's compact B storage (ops.stack_lora_weights_compact) its ``LayerCall``
    as ``kernel_call``, which the punica wrapper uses when present."""
    b_stacked.kernel_call = LayerCall(a_stacked.cat[:, 0], b_stacked.cat[:, 0], b_stacked.cols)


def group_args(rows: torch.Tensor, slots: torch.Tensor, ends: torch.Tensor) -> tuple:
    """The kernel's grouping arguments for one step (int64, contiguous tensors the caller keeps
    alive for the step): rows, number of groups, slots, ends."""
    return (rows.data_ptr(), slots.numel(), slots.data_ptr(), ends.data_ptr())

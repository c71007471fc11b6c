"""dtype `auto`: bfloat16 where the hardware does bf16 natively, float32 on other CPUs."""

from __future__ import annotations

import pytest
import torch

from serving.hardware import cpu_has_native_bf16, cpu_model_name, resolve_dtype


@pytest.mark.parametrize("dtype", ["bfloat16", "float32", "float16"])
def test_an_explicit_dtype_is_kept(dtype: str) -> None:
    assert resolve_dtype(dtype, gpu=False) == dtype
    assert resolve_dtype(dtype, gpu=True) == dtype


def test_auto_is_bfloat16_on_a_gpu() -> None:
    assert resolve_dtype("auto", gpu=True) == "bfloat16"


@pytest.mark.parametrize(
    ("caps", "expected"),
    [
        ({"avx2": True, "avx512_bf16": False, "amx_bf16": False}, "float32"),
        ({"avx2": True, "avx512_bf16": True}, "bfloat16"),
        ({"amx_bf16": True}, "bfloat16"),
    ],
)
def test_auto_on_a_cpu_follows_its_bf16_support(monkeypatch, caps, expected) -> None:
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: caps)
    assert resolve_dtype("auto", gpu=False) == expected


def test_this_machine_is_described() -> None:
    assert cpu_model_name()
    assert isinstance(cpu_has_native_bf16(), bool)

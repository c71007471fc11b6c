"""Correctness fix for vLLM 0.32's CPU LoRA path, loaded as a vLLM general plugin.

vLLM marks tokens that use no adapter with index -1. The GPU kernels skip them; the CPU torch ops
(`vllm/lora/ops/torch_ops/lora_ops.py`) gather `lora_a_weights[indices]`, and Python indexing reads
-1 as the *last* adapter slot. So in a batch that mixes base-model requests with adapter
requests, the base requests silently run with whichever adapter sits in the last slot (seen on
this project's CI machine: a base request's greedy text changed with its batch mates).

The fix: after the shrink op (x @ A, shape tokens x rank) zero the rows of tokens with index -1.
The expand op then adds 0 @ B = 0 for them, which is exactly "no adapter". This is always on
(it is a correctness fix, not an optimisation) and stands down on any other vLLM version."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


_PATCHED = "_tenantlora_no_lora_fix"


def masked_bgmv_shrink(original):
    def bgmv_shrink(inputs, lora_a_weights, output_tensor, lora_indices_tensor, scaling=1.0):
        original(inputs, lora_a_weights, output_tensor, lora_indices_tensor, scaling)
        no_lora = lora_indices_tensor < 0
        if bool(no_lora.any()):
            output_tensor[: no_lora.shape[0]][no_lora] = 0

    setattr(bgmv_shrink, _PATCHED, True)
    return bgmv_shrink


def register() -> None:
    import vllm

    from serving.vllm_compat import vllm_supported

    if not vllm_supported(vllm.__version__):
        log.warning(
            "tenantlora: no-adapter fix not tested with vLLM %s: standing down", vllm.__version__
        )
        return
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu

    if getattr(lora_ops.bgmv_shrink, _PATCHED, False):
        return
    fixed = masked_bgmv_shrink(lora_ops.bgmv_shrink)
    lora_ops.bgmv_shrink = fixed  # used by sgmv_shrink (prefill)
    punica_cpu.bgmv_shrink = fixed  # used by the CPU punica wrapper (decode)

"""vLLM general plugin (entry point ``vllm.general_plugins`` -> ``register``): grouped LoRA ops
for vLLM's CPU backend, loaded by vLLM in every process it starts.

What it changes, on the CPU platform of vLLM 0.32.0 only:

- the punica wrapper: ``GroupedPunicaWrapperCPU`` groups the step's tokens by adapter once per
  step (``update_metadata``) and runs each linear LoRA layer as grouped matmuls
  (``serving.cpu_lora.ops.grouped_lora_linear``); everything else stays vLLM's own code;
- the linear LoRA layers' weight storage: after vLLM creates a layer, its per-slice
  ``lora_a_stacked``/``lora_b_stacked`` become views into one stacked tensor each, so the
  projections that share an input (q/k/v, gate/up) run as one shrink and one expand. With the
  fused C++ kernel (serving/cpu_lora/kernel.py, built with g++ on first use) the storage keeps
  the LoRA dtype (vLLM's ``--lora-dtype``, the model's by default) and a compact expand, and each
  layer is one kernel call (bf16 weights also under a float32 model); without a compiler
  it is float32 for PyTorch's grouped GEMM (``ops.grouped_lora_linear``);
- compilation: vLLM's CPU platform compiles nothing when LoRA is on; with the wrapper's LoRA call
  one opaque custom op, the model is compiled as it is without LoRA (``--enforce-eager`` still
  turns it off).

Switch: ``TENANTLORA_CPU_LORA_OPS`` ("1": on; unset or "0": off, so vLLM processes that
tenantlora did not start stay unchanged). ``tenantlora serve`` sets it from its
``cpu_lora_ops`` setting (on by default; ``--no-cpu-lora-ops`` turns it off), and vLLM's child
processes inherit it. On any other vLLM version, or another platform, the plugin stands down
with one log line and vLLM runs unchanged.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

ENV_SWITCH = "TENANTLORA_CPU_LORA_OPS"
WRAPPER_QUALNAME = "serving.cpu_lora.punica.GroupedPunicaWrapperCPU"

# Under the "vllm" logger, which vLLM configures in every process (handler, level, prefix).
logger = logging.getLogger("vllm.tenantlora.cpu_lora")
_state: dict[str, Any] = {"registered": False}


def enabled_by_env() -> bool:
    return os.environ.get(ENV_SWITCH, "0").strip().lower() not in ("0", "false", "no", "off")


def register() -> None:
    """Entry point. Idempotent: vLLM may call it more than once per process."""
    if _state["registered"]:
        return
    _state["registered"] = True
    import vllm

    # vLLM configures its loggers after general plugins load, so INFO would be lost here: the
    # stand-down lines are warnings, the "on" line comes from the wrapper (punica.py) at INFO.
    if not enabled_by_env():
        logger.warning("tenantlora CPU LoRA ops: off (%s=0)", ENV_SWITCH)
        return
    from serving.vllm_compat import vllm_supported

    if not vllm_supported(vllm.__version__):
        logger.warning(
            "tenantlora CPU LoRA ops: standing down, not tested with vLLM %s", vllm.__version__
        )
        return
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        logger.debug("tenantlora CPU LoRA ops: not a CPU platform, nothing to do")
        return
    if not hasattr(torch, "_grouped_mm"):
        logger.warning("tenantlora CPU LoRA ops: standing down, torch has no _grouped_mm")
        return
    _patch()


def _patch() -> None:
    import vllm.lora.model_manager as model_manager
    import vllm.lora.utils as lora_utils
    from vllm.platforms import current_platform

    # vLLM builds the punica wrapper from this qualname (vllm/lora/punica_wrapper/punica_selector.py)
    type(current_platform).get_punica_wrapper = classmethod(lambda cls: WRAPPER_QUALNAME)

    original = lora_utils.from_layer

    def from_layer(*args, **kwargs):
        layer = original(*args, **kwargs)
        _stack_layer_weights(layer)
        return layer

    lora_utils.from_layer = from_layer
    model_manager.from_layer = from_layer

    # vLLM's CPU platform turns compilation off whenever LoRA is on (its punica ops don't trace).
    # The grouped wrapper's LoRA call is one opaque custom op (punica.py), so the model compiles
    # around it: one request alone went from 22.8 to 13.8 ms a token in-process (AMD EPYC, bf16).
    platform = type(current_platform)
    check = platform.check_and_update_config.__func__

    def check_and_update_config(cls, vllm_config):
        lora = vllm_config.lora_config
        vllm_config.lora_config = None  # the only LoRA branch there is the one switching it off
        try:
            check(cls, vllm_config)
        finally:
            vllm_config.lora_config = lora
        if lora is not None:
            logger.warning(  # INFO would be lost this early (see register)
                "tenantlora CPU LoRA ops: compilation mode %s kept with LoRA on",
                getattr(vllm_config.compilation_config.mode, "name", "default"),
            )

    platform.check_and_update_config = classmethod(check_and_update_config)


def _stack_layer_weights(layer: Any) -> None:
    """Move a linear LoRA layer's adapter weights into stacked storage (see ops.stack_lora_weights).

    Only for the plain (not fully sharded, single-rank) linear LoRA layers whose forward goes
    through ``punica_wrapper.add_lora_linear``; other layers keep vLLM's tensors and ops.
    """
    from vllm.lora.layers import (
        ColumnParallelLinearWithLoRA,
        MergedColumnParallelLinearWithLoRA,
        QKVParallelLinearWithLoRA,
        ReplicatedLinearWithLoRA,
        RowParallelLinearWithLoRA,
    )
    from vllm.lora.layers.column_parallel_linear import MergedQKVParallelLinearWithLoRA

    plain = (
        ColumnParallelLinearWithLoRA,
        MergedColumnParallelLinearWithLoRA,
        QKVParallelLinearWithLoRA,
        MergedQKVParallelLinearWithLoRA,
        ReplicatedLinearWithLoRA,
        RowParallelLinearWithLoRA,
    )
    if type(layer) not in plain or getattr(layer, "tp_size", 1) != 1:
        return
    if layer.lora_config.fully_sharded_loras or layer.lora_a_stacked[0].device.type != "cpu":
        return
    from . import kernel
    from .ops import stack_lora_weights, stack_lora_weights_compact

    if layer.lora_a_stacked[0].dtype in kernel.DTYPES and kernel.load() is not None:
        stacked = stack_lora_weights_compact(layer.lora_a_stacked, layer.lora_b_stacked)
    else:
        stacked = stack_lora_weights(layer.lora_a_stacked, layer.lora_b_stacked)
    if stacked is not None and sum(layer.output_slices) == stacked[1].cat.shape[3]:
        if hasattr(stacked[1], "cols"):
            kernel.bind(*stacked)
        layer.lora_a_stacked, layer.lora_b_stacked = stacked
        from .punica import register_layer

        register_layer(*stacked, layer.output_slices)

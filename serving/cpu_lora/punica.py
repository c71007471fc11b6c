"""The punica wrapper the plugin hands vLLM on the CPU: vLLM's own ``PunicaWrapperCPU`` with the
linear LoRA op replaced by the grouped one (serving.cpu_lora.ops)."""

from __future__ import annotations

import torch
from torch.library import Library
from vllm.logger import init_logger
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU
from vllm.utils.torch_utils import direct_register_custom_op

from . import kernel
from .ops import TokenGroups, group_tokens, grouped_lora_linear

logger = init_logger("vllm.tenantlora.cpu_lora")

# Every stacked layer's (a, b, output_slices), by the id its B storage carries (``op_id``), and
# the process's wrapper (one model, one wrapper): what the custom op reads at run time.
_LAYERS: list[tuple] = []
_WRAPPER: list[GroupedPunicaWrapperCPU] = []


def register_layer(a_stacked, b_stacked, output_slices: tuple[int, ...]) -> None:
    """Give a stacked layer the id the custom op finds it by."""
    b_stacked.op_id = len(_LAYERS)
    _LAYERS.append((a_stacked, b_stacked, tuple(output_slices)))


def _lora_linear(y: torch.Tensor, x: torch.Tensor, layer: int, scale: float) -> None:
    a, b, slices = _LAYERS[layer]
    _WRAPPER[0].add_lora_linear_now(y, x, a, b, scale, slices)


def _lora_linear_fake(y: torch.Tensor, x: torch.Tensor, layer: int, scale: float) -> None:
    return None


# One opaque op per LoRA layer call, so torch.compile traces the model around it: the step's
# grouping is read when the op runs, never baked into the compiled graph.
_LIB = Library("tenantlora", "FRAGMENT")
direct_register_custom_op(
    "lora_linear", _lora_linear, mutates_args=["y"], fake_impl=_lora_linear_fake, target_lib=_LIB
)


class GroupedPunicaWrapperCPU(PunicaWrapperCPU):
    """``update_metadata`` (once per step) also groups the step's tokens by adapter slot;
    ``add_lora_linear`` (once per linear LoRA layer) uses that grouping when the layer's weights
    were stacked by the plugin, and falls back to vLLM's own op in every other case."""

    groups: TokenGroups | None = None
    group_args: tuple | None = None  # the step's grouping as the kernel's arguments

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _WRAPPER[:] = [self]
        logger.info_once(
            "tenantlora CPU LoRA ops: on (grouped LoRA matmuls; TENANTLORA_CPU_LORA_OPS=0 turns "
            "them off)"
        )

    def update_metadata(self, mapping, lora_index_to_id, max_loras, vocab_size, **kwargs):
        super().update_metadata(mapping, lora_index_to_id, max_loras, vocab_size, **kwargs)
        groups = self.groups = group_tokens(self.token_lora_indices, len(lora_index_to_id))
        self.group_args = (
            None if groups is None else kernel.group_args(groups.rows, groups.slots, groups.ends)
        )

    def add_lora_linear(
        self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, *, buffer=None, **kwargs
    ):
        """A layer the plugin stacked goes through the custom op (traced as one call when the
        model is compiled); any other call runs ``add_lora_linear_now`` directly."""
        op_id = getattr(lora_b_stacked, "op_id", None)
        if op_id is not None and buffer is None and kwargs.get("add_inputs", True) is True:
            torch.ops.tenantlora.lora_linear(y, x, op_id, scale)
            return None
        return self.add_lora_linear_now(
            y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, buffer=buffer, **kwargs
        )

    def add_lora_linear_now(
        self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, *, buffer=None, **kwargs
    ):
        """The layer's LoRA delta added to y now, from this step's grouping."""
        groups = self.groups
        plain = buffer is None and kwargs.get("add_inputs", True) is True
        if groups is None and plain:
            return None  # no token of this step has an adapter: the common base-only step
        if getattr(lora_b_stacked, "cols", None) is not None:  # the kernel's compact storage
            call = getattr(lora_b_stacked, "kernel_call", None)
            if call is not None and plain and call.fits(y, x, groups.num_tokens, groups.max_slot):
                call(y, x, self.group_args, scale)  # the fused kernel, arguments bound per layer
                return None
            return super().add_lora_linear(  # a call the kernel's storage does not fit
                y, x, lora_a_stacked, lora_b_stacked, scale, output_slices,
                buffer=buffer, **kwargs,
            )  # fmt: skip
        a_cat = getattr(lora_a_stacked, "cat", None)  # (S, 1, K, R)
        b_cat = getattr(lora_b_stacked, "cat", None)
        y2 = y.view(-1, y.shape[-1])
        x2 = x.view(-1, x.shape[-1])
        if (
            not plain
            or a_cat is None
            or b_cat is None
            or y2.shape[1] != b_cat.shape[3]
            or x2.shape[0] != y2.shape[0]
            or x2.shape[0] != groups.num_tokens
        ):
            return super().add_lora_linear(
                y, x, lora_a_stacked, lora_b_stacked, scale, output_slices,
                buffer=buffer, **kwargs,
            )  # fmt: skip
        grouped_lora_linear(y2, x2, a_cat, b_cat, groups, scale)
        return None

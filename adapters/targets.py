"""The LoRA target modules tenantlora trains, serves and validates: every attention and MLP
projection of a Llama-style decoder block (what vLLM's LoRA layers wrap)."""

from __future__ import annotations

LORA_TARGET_MODULES: tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)

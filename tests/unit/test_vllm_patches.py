"""The no-adapter fix for vLLM's CPU LoRA ops, against a per-token reference."""

from __future__ import annotations

import torch

from serving.vllm_compat.patches import masked_bgmv_shrink


def test_tokens_without_adapter_get_no_lora_contribution():
    from vllm.lora.ops.torch_ops import lora_ops

    torch.manual_seed(0)
    tokens, hidden, rank, slots = 7, 32, 4, 3
    x = torch.randn(tokens, hidden, dtype=torch.bfloat16)
    lora_a = torch.randn(slots, 1, rank, hidden, dtype=torch.bfloat16)
    indices = torch.tensor([0, -1, 2, -1, 1, 2, -1])

    stock = torch.zeros(tokens, rank, dtype=torch.float32)
    lora_ops.bgmv_shrink(x, lora_a, stock, indices, 0.5)
    fixed = torch.zeros(tokens, rank, dtype=torch.float32)
    masked_bgmv_shrink(lora_ops.bgmv_shrink)(x, lora_a, fixed, indices, 0.5)

    for t, slot in enumerate(indices.tolist()):
        if slot < 0:
            assert torch.equal(fixed[t], torch.zeros(rank))
            # the stock op reads slot -1 as the last adapter: the bug being fixed
            want_bug = 0.5 * (x[t].float() @ lora_a[-1, 0].float().T)
            torch.testing.assert_close(stock[t], want_bug, rtol=2e-2, atol=2e-2)
        else:
            assert torch.equal(fixed[t], stock[t])
            want = 0.5 * (x[t].float() @ lora_a[slot, 0].float().T)
            torch.testing.assert_close(fixed[t], want, rtol=2e-2, atol=2e-2)

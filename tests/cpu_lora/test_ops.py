"""The grouped CPU LoRA ops against vLLM 0.32's own reference ops (no engine, a few seconds).

Tolerance. Both compute the same float32 products and round at the same points; only the order
of the float32 sums differs (the reference runs one 1-row product per token, the grouped op one
GEMM per adapter, and MKL blocks each differently). So float32 results agree within 1e-5, and a
bf16/fp16 result is either bit-identical or, where a float32 sum lands next to a rounding boundary,
off by a rounding step: of the rank-r intermediate (which then moves the whole LoRA delta of that
token by about 2^-m of itself, m the mantissa bits), of the delta, or of the output. The bound
checked is 1 ulp of the output + 2^-(m-1) of the token's largest |delta|; and for batches of 32+
tokens at most 2% of the elements may differ at all (typically 0-0.1%).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")

from vllm.lora.layers import LoRAMapping  # noqa: E402
from vllm.lora.ops.torch_ops import bgmv_expand_slice, bgmv_shrink  # noqa: E402
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU  # noqa: E402

from serving.cpu_lora import kernel  # noqa: E402
from serving.cpu_lora.ops import (  # noqa: E402
    group_tokens,
    grouped_lora_linear,
    stack_lora_weights,
    stack_lora_weights_compact,
)
from serving.cpu_lora.punica import GroupedPunicaWrapperCPU  # noqa: E402

# (input size, output slices): o_proj/down_proj-like single slices, q/k/v and gate/up stacks.
LAYERS = [(64, (48,)), (96, (96, 32, 32)), (80, (160, 160)), (576, (576, 192, 192))]


def _weights(slots, k, outs, r, dtype, seed, empty_last=True):
    """vLLM-layout per-slice weights (S, 1, r, K) / (S, 1, N_i, r) plus the stacked copy.

    The last slot stays zero when ``empty_last``: vLLM's reference applies it to tokens without an
    adapter (slot -1), so only then is "no adapter" the same in both.
    """
    gen = torch.Generator().manual_seed(seed)
    a = tuple(torch.zeros(slots, 1, r, k, dtype=dtype) for _ in outs)
    b = tuple(torch.zeros(slots, 1, n, r, dtype=dtype) for n in outs)
    filled = slots - 1 if empty_last else slots
    for i, n in enumerate(outs):
        a[i][:filled] = (torch.randn(filled, 1, r, k, generator=gen) * 0.1).to(dtype)
        b[i][:filled] = (torch.randn(filled, 1, n, r, generator=gen) * 0.1).to(dtype)
    sa, sb = stack_lora_weights(a, b)
    for i in range(len(outs)):  # what vLLM's set_lora does: copy into the (view) slots
        sa[i].copy_(a[i])
        sb[i].copy_(b[i])
    return a, b, sa, sb


def _reference(y, x, a, b, slots_of_tokens, scale):
    """vLLM's CPU path for one linear LoRA layer (PunicaWrapperCPU.add_lora_linear, decode)."""
    offset = 0
    for i, n in enumerate(b_out(b)):
        buffer = torch.zeros(x.shape[0], a[i].shape[2], dtype=torch.float32)
        bgmv_shrink(x, a[i], buffer, slots_of_tokens, scale)
        bgmv_expand_slice(buffer, b[i], y, slots_of_tokens, offset, n, True)
        offset += n


def b_out(b):
    return [t.shape[2] for t in b]


def _ulp(t: torch.Tensor) -> torch.Tensor:
    """Spacing of t's dtype at each value of t (as float32)."""
    mantissa_bits = {torch.bfloat16: 7, torch.float16: 10}[t.dtype]
    exp = torch.floor(torch.log2(t.float().abs().clamp_min(torch.finfo(t.dtype).tiny)))
    return torch.exp2(exp - mantissa_bits)


def _assert_close(got, want, y0, dtype):
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        return
    diff = (got.float() - want.float()).abs()
    delta = (want.float() - y0.float()).abs().amax(dim=1, keepdim=True)
    mantissa_bits = {torch.bfloat16: 7, torch.float16: 10}[dtype]
    bound = _ulp(want) + delta * 2.0 ** (1 - mantissa_bits)
    assert (diff <= bound).all(), f"max diff {diff.max()} over the bound"
    if got.shape[0] >= 32:
        share = (diff > 0).float().mean().item()
        assert share <= 0.02, f"{share:.2%} of the elements differ"


CASES = [
    # dtype, tokens, slots, adapters used, rank, share of tokens without adapter, scale
    (torch.bfloat16, 32, 8, 1, 16, 0.0, 1.0),
    (torch.bfloat16, 32, 8, 7, 16, 0.0, 1.0),
    (torch.bfloat16, 37, 8, 5, 8, 0.3, 1.0),
    (torch.bfloat16, 1, 4, 1, 16, 0.0, 1.0),
    (torch.bfloat16, 200, 33, 32, 16, 0.1, 1.0),
    (torch.bfloat16, 64, 8, 3, 4, 0.5, 0.5),
    (torch.bfloat16, 16, 4, 2, 64, 0.25, 1.0),
    (torch.float16, 40, 8, 4, 16, 0.2, 1.0),
    (torch.float32, 40, 8, 6, 16, 0.2, 2.0),
    (torch.float32, 5, 3, 1, 32, 0.0, 1.0),
]


def _case_batch(case, layer, a, b, seed):
    """A case's token slots, activations, base output and vLLM's reference result."""
    dtype, tokens, _, used, _, none_share, scale = case
    k, outs = layer
    gen = torch.Generator().manual_seed(seed)
    token_slots = torch.randint(0, used, (tokens,), generator=gen)
    token_slots[torch.rand(tokens, generator=gen) < none_share] = -1
    x = torch.randn(tokens, k, generator=gen).to(dtype)
    y0 = torch.randn(tokens, sum(outs), generator=gen).to(dtype)
    want = y0.clone()
    _reference(want, x, a, b, token_slots, scale)
    return token_slots, x, y0, want


@pytest.mark.parametrize("layer", LAYERS, ids=lambda lay: f"k{lay[0]}-{len(lay[1])}slices")
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{str(c[0])[6:]}-t{c[1]}-a{c[3]}-r{c[4]}")
def test_grouped_lora_linear_matches_reference(layer, case):
    dtype, tokens, slots, used, rank, none_share, scale = case
    k, outs = layer
    a, b, sa, sb = _weights(slots, k, outs, rank, dtype, seed=tokens * 31 + used)
    token_slots, x, y0, want = _case_batch(case, layer, a, b, seed=tokens + rank)
    got = y0.clone()
    groups = group_tokens(token_slots, slots)
    if groups is not None:
        grouped_lora_linear(got, x, sa.cat, sb.cat, groups, scale)
    _assert_close(got, want, y0, dtype)
    if (token_slots >= 0).any():
        assert not torch.equal(got, y0), "the adapters must change the output"


def test_tokens_without_adapter_are_untouched_even_when_all_slots_are_full():
    # vLLM 0.32's CPU reference would add the last slot's adapter to these rows.
    a, b, sa, sb = _weights(4, 64, (32, 32), 8, torch.bfloat16, seed=1, empty_last=False)
    token_slots = torch.tensor([-1, 3, -1, 0, 2, -1])
    x = torch.randn(6, 64).bfloat16()
    y0 = torch.randn(6, 64).bfloat16()
    got = y0.clone()
    grouped_lora_linear(got, x, sa.cat, sb.cat, group_tokens(token_slots, 4))
    none = token_slots < 0
    assert torch.equal(got[none], y0[none])
    assert not torch.equal(got[~none], y0[~none])


def test_group_tokens():
    assert group_tokens(torch.tensor([-1, -1]), 4) is None
    single = group_tokens(torch.tensor([2, 2, 2]), 4)
    assert single.single == 2 and single.perm is None
    g = group_tokens(torch.tensor([3, -1, 0, 3, 0, 1]), 4)
    assert g.single is None and g.num_tokens == 6
    assert g.perm.tolist() == [2, 4, 5, 0, 3]
    assert g.offs.tolist() == [2, 3, 3, 5] and g.offs.dtype == torch.int32
    mixed_none = group_tokens(torch.tensor([1, -1, 1]), 4)  # one adapter but not every token
    assert mixed_none.single is None and mixed_none.perm.tolist() == [0, 2]


def test_stacked_views_write_through_and_keep_block_diagonal_zero():
    a, b, sa, sb = _weights(3, 16, (8, 4), 2, torch.bfloat16, seed=2, empty_last=False)
    assert [t.shape for t in sa] == [t.shape for t in a]
    assert [t.shape for t in sb] == [t.shape for t in b]
    assert sa.cat.shape == (3, 1, 16, 4) and sb.cat.shape == (3, 1, 4, 12)  # stored transposed
    assert sa.cat.is_contiguous() and sb.cat.is_contiguous()
    sb[1][2] = 0  # what vLLM's reset_lora does
    assert sb.cat[2, 0, 2:, 8:].abs().sum() == 0
    assert torch.equal(sb.cat[1, 0, :2, :8], b[0][1, 0].float().T)
    assert torch.equal(sa.cat[1, 0, :, 2:], a[1][1, 0].float().T)
    assert sb.cat[:, :, 2:, :8].abs().sum() == 0 and sb.cat[:, :, :2, 8:].abs().sum() == 0
    assert stack_lora_weights(a, b[:1]) is None


def _mapping(token_ids, prefill):
    return LoRAMapping(index_mapping=tuple(token_ids), prompt_mapping=tuple(token_ids),
                       is_prefill=prefill)  # fmt: skip


@pytest.mark.parametrize("layout", ["grouped", "kernel"])
@pytest.mark.parametrize("prefill", [False, True])
def test_punica_wrapper_matches_vllm_wrapper(prefill, layout):
    """The wrapper the plugin installs, against vLLM's PunicaWrapperCPU, through update_metadata:
    with the torch grouped op's float32 storage and with the kernel's compact storage."""
    slots, k, outs, rank = 6, 96, (96, 32, 32), 16
    stack = _weights if layout == "grouped" else _compact_weights
    a, b, sa, sb = stack(slots, k, outs, rank, torch.bfloat16, seed=3)
    lora_index_to_id = [11, 12, 13, None, 15, None]  # slot -> adapter id
    ids = [11, 0, 12, 12, 15, 0, 13, 11, 11, 15]  # one per token; 0: no adapter
    x = torch.randn(len(ids), k).bfloat16()
    y0 = torch.randn(len(ids), sum(outs)).bfloat16()
    ref, new = PunicaWrapperCPU(64, 8, "cpu"), GroupedPunicaWrapperCPU(64, 8, "cpu")
    results = []
    for wrapper, (wa, wb) in ((ref, (a, b)), (new, (sa, sb))):
        wrapper.update_metadata(_mapping(ids, prefill), lora_index_to_id, slots + 1, 1000)
        y = y0.clone()
        wrapper.add_lora_linear(y, x, wa, wb, 1.0, outs)
        results.append(y)
    _assert_close(results[1], results[0], y0, torch.bfloat16)
    if layout == "grouped":
        assert torch.equal(results[0], results[1])
    assert not torch.equal(results[1], y0)


def test_punica_wrapper_falls_back_for_unstacked_weights():
    a, b, _, _ = _weights(4, 32, (16,), 4, torch.bfloat16, seed=4)
    ids = [1, 2, 0, 1]
    x, y0 = torch.randn(4, 32).bfloat16(), torch.randn(4, 16).bfloat16()
    ys = []
    for wrapper in (PunicaWrapperCPU(64, 8, "cpu"), GroupedPunicaWrapperCPU(64, 8, "cpu")):
        wrapper.update_metadata(_mapping(ids, False), [1, 2, None, None], 5, 1000)
        y = y0.clone()
        wrapper.add_lora_linear(y, x, a, b, 1.0, (16,))
        ys.append(y)
    assert torch.equal(ys[0], ys[1])


# ---- the fused C++ kernel (serving/cpu_lora/lora_kernel.cpp) over the compact layout


def _compact_weights(slots, k, outs, r, dtype, seed):
    a, b, _, _ = _weights(slots, k, outs, r, dtype, seed)
    sa, sb = stack_lora_weights_compact(a, b)
    for i in range(len(outs)):
        sa[i].copy_(a[i])
        sb[i].copy_(b[i])
    kernel.bind(sa, sb)  # as the plugin does
    return a, b, sa, sb


def _kernel_lora_linear(y, x, sa, sb, groups, scale):
    """The layer's bound kernel call (kernel.bind in _compact_weights), arguments unchecked."""
    sb.kernel_call(y, x, kernel.group_args(groups.rows, groups.slots, groups.ends), scale)


def test_kernel_builds_here():
    assert kernel.load() is not None, "g++ is part of the install; the kernel must build"


KERNEL_CASES = [c for c in CASES if c[0] in kernel.DTYPES] + [
    (torch.bfloat16, 300, 8, 1, 16, 0.0, 1.0),  # a prefill-sized single group
    (torch.bfloat16, 9, 4, 3, 8, 0.0, 0.25),  # R = 8 or 16 or 24: the vector tails
    (torch.float32, 70, 6, 5, 8, 0.1, 1.0),
]


@pytest.mark.parametrize("layer", LAYERS + [(100, (50, 30))], ids=lambda lay: f"k{lay[0]}-{lay[1]}")
@pytest.mark.parametrize(
    "case", KERNEL_CASES, ids=lambda c: f"{str(c[0])[6:]}-t{c[1]}-a{c[3]}-r{c[4]}"
)
def test_kernel_matches_reference(layer, case):
    dtype, tokens, slots, used, rank, none_share, scale = case
    k, outs = layer
    a, b, sa, sb = _compact_weights(slots, k, outs, rank, dtype, seed=tokens * 7 + used)
    token_slots, x, y0, want = _case_batch(case, layer, a, b, seed=tokens + rank + 1)
    got = y0.clone()
    groups = group_tokens(token_slots, slots)
    if groups is not None:
        _kernel_lora_linear(got, x, sa, sb, groups, scale)
    _assert_close(got, want, y0, dtype)
    none = token_slots < 0
    assert torch.equal(got[none], y0[none]), "rows without an adapter must stay as they were"
    if (~none).any():
        assert not torch.equal(got[~none], y0[~none]), "the adapters must change the output"


MIXED_CASES = [  # tokens, slots, adapters used, rank, share without adapter, scale
    (32, 8, 1, 16, 0.0, 1.0),
    (32, 33, 32, 16, 0.1, 1.0),
    (37, 8, 5, 8, 0.3, 2.0),
    (300, 4, 1, 16, 0.0, 1.0),
    (9, 4, 3, 24, 0.0, 0.25),
]


@pytest.mark.parametrize("layer", LAYERS + [(100, (50, 30))], ids=lambda lay: f"k{lay[0]}-{lay[1]}")
@pytest.mark.parametrize("case", MIXED_CASES, ids=lambda c: f"t{c[0]}-a{c[2]}-r{c[3]}")
def test_kernel_bf16_weights_with_float32_activations(layer, case):
    """vLLM's ``--lora-dtype bfloat16`` on a float32 model: bf16 weight storage, float32 x and y.
    vLLM's reference converts the weights to float32 and sums in float32, so the results agree
    as float32 ones do."""
    tokens, slots, used, rank, none_share, scale = case
    k, outs = layer
    a, b, sa, sb = _compact_weights(slots, k, outs, rank, torch.bfloat16, seed=tokens + used)
    assert sa.cat.dtype == torch.bfloat16
    float_case = (torch.float32, tokens, slots, used, rank, none_share, scale)
    token_slots, x, y0, want = _case_batch(float_case, layer, a, b, seed=tokens * 3 + rank)
    assert x.dtype == y0.dtype == torch.float32
    got = y0.clone()
    groups = group_tokens(token_slots, slots)
    assert sb.kernel_call.fits(got, x, tokens, groups.max_slot)
    _kernel_lora_linear(got, x, sa, sb, groups, scale)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    none = token_slots < 0
    assert torch.equal(got[none], y0[none])
    assert not torch.equal(got[~none], y0[~none])


def test_kernel_reads_strided_rows_and_leaves_other_rows_alone():
    """x as a column slice of a wider tensor (row stride > K) and y as rows of a bigger buffer."""
    a, b, sa, sb = _compact_weights(4, 64, (32, 16), 8, torch.bfloat16, seed=5)
    wide = torch.randn(6, 100).bfloat16()
    x = wide[:, 10:74]
    token_slots = torch.tensor([2, 0, -1, 2, 3, 0])
    y0 = torch.randn(6, 48).bfloat16()
    want = y0.clone()
    _reference(want, x.contiguous(), a, b, token_slots, 1.0)
    got = y0.clone()
    _kernel_lora_linear(got, x, sa, sb, group_tokens(token_slots, 4), 1.0)
    _assert_close(got, want, y0, torch.bfloat16)
    assert torch.equal(got[2], y0[2])


def test_compact_views_write_through_without_block_diagonal_zeros():
    a, b, sa, sb = _compact_weights(3, 16, (8, 4), 2, torch.bfloat16, seed=2)
    assert [t.shape for t in sa] == [t.shape for t in a]
    assert [t.shape for t in sb] == [t.shape for t in b]
    assert sa.cat.dtype == sb.cat.dtype == torch.bfloat16
    assert sb.cat.shape == (3, 1, 2, 12) and sb.cols.tolist() == [0, 8, 12]
    assert torch.equal(sb.cat[1, 0, :, :8], b[0][1, 0].T)
    assert torch.equal(sb.cat[1, 0, :, 8:], b[1][1, 0].T)
    sb[1][1] = 0  # what vLLM's reset_lora does: slice 1 of slot 1 only
    assert sb.cat[1, 0, :, 8:].abs().sum() == 0 and sb.cat[1, 0, :, :8].abs().sum() > 0


def test_group_tokens_kernel_fields():
    g = group_tokens(torch.tensor([3, -1, 0, 3, 0, 1]), 4)
    assert g.rows.tolist() == [2, 4, 5, 0, 3]
    assert g.slots.tolist() == [0, 1, 3] and g.ends.tolist() == [2, 3, 5] and g.max_slot == 3
    single = group_tokens(torch.tensor([2, 2, 2]), 4)
    assert single.rows.tolist() == [0, 1, 2] and single.slots.tolist() == [2]
    assert single.ends.tolist() == [3]


@pytest.mark.parametrize("dtype", kernel.DTYPES, ids=str)
@pytest.mark.parametrize("layer", [(96, (96, 32, 32)), (1536, (576,)), (40, (50, 7))], ids=str)
def test_kernel_every_group_size(dtype, layer):
    """Groups of 1 to 13 rows: groups of up to eight rows (decode) read B as one stream in blocks
    of one to four rows; larger groups (prefill) sum full four-row blocks in register tiles, with
    a one- to three-row block at the end (9-13 rows)."""
    k, outs = layer
    sizes = list(range(1, 14))
    a, b, sa, sb = _compact_weights(len(sizes) + 1, k, outs, 16, dtype, seed=len(outs))
    token_slots = torch.tensor([s for s, n in enumerate(sizes) for _ in range(n)] + [-1, -1])
    token_slots = token_slots[
        torch.randperm(token_slots.numel(), generator=torch.Generator().manual_seed(0))
    ]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(token_slots.numel(), k, generator=gen).to(dtype)
    y0 = torch.randn(token_slots.numel(), sum(outs), generator=gen).to(dtype)
    want = y0.clone()
    _reference(want, x, a, b, token_slots, 0.5)
    got = y0.clone()
    _kernel_lora_linear(got, x, sa, sb, group_tokens(token_slots, len(sizes) + 1), 0.5)
    _assert_close(got, want, y0, dtype)
    none = token_slots < 0
    assert torch.equal(got[none], y0[none])
    assert not torch.equal(got[~none], y0[~none])


def test_layer_call_refuses_what_it_was_not_bound_for():
    """The kernel trusts its arguments, so the bound call checks every one it takes from the
    caller; the wrapper then falls back to vLLM's op, with the same result."""
    slots, k, outs = 4, 64, (32, 16)
    a, b, sa, sb = _compact_weights(slots, k, outs, 8, torch.bfloat16, seed=7)
    call = sb.kernel_call
    gen = torch.Generator().manual_seed(9)
    x, y = torch.randn(5, k, generator=gen).bfloat16(), torch.randn(5, 48, generator=gen).bfloat16()
    assert call.fits(y, x, 5, slots - 1)
    assert call.fits(y.float(), x.float(), 5, slots - 1)  # bf16 weights, float32 model
    refused = {
        "x dtype": (y, x.float(), 5, 0),
        "y dtype": (y.half(), x, 5, 0),
        "float16 x and y": (y.half(), x.half(), 5, 0),
        "x column stride": (y, torch.randn(k, 5).bfloat16().T, 5, 0),
        "y column stride": (torch.randn(48, 5).bfloat16().T, x, 5, 0),
        "K": (y, torch.randn(5, k + 1).bfloat16(), 5, 0),
        "N": (torch.randn(5, 47).bfloat16(), x, 5, 0),
        "token count": (y, x, 4, 0),
        "rows of x and y": (y[:4], x, 5, 0),
        "slot past the storage": (y, x, 5, slots),
        "3-d x": (y, x.unsqueeze(0), 5, 0),
    }
    for what, args in refused.items():
        assert not call.fits(*args), what
    ids = [1, 2, 0, 1, 2]
    x32 = x.float()  # a dtype the bound call refuses: the wrapper must still be right
    ys = []
    for wrapper, (wa, wb) in ((PunicaWrapperCPU(64, 8, "cpu"), (a, b)),
                              (GroupedPunicaWrapperCPU(64, 8, "cpu"), (sa, sb))):  # fmt: skip
        wrapper.update_metadata(_mapping(ids, False), [1, 2, None, None], slots + 1, 1000)
        out = y.clone()
        wrapper.add_lora_linear(out, x32, wa, wb, 1.0, outs)
        ys.append(out)
    _assert_close(ys[1], ys[0], y, torch.bfloat16)  # vLLM's op on two layouts of the weights
    assert not torch.equal(ys[1], y)


def test_punica_wrapper_uses_the_bound_kernel_call(monkeypatch):
    """With the plugin's storage the wrapper's fast path is the bound kernel call (not a
    fallback that would also give the right numbers)."""
    a, b, sa, sb = _compact_weights(4, 64, (32, 16), 8, torch.bfloat16, seed=8)
    calls = []
    real = kernel.LayerCall.__call__
    monkeypatch.setattr(
        kernel.LayerCall, "__call__", lambda self, *args: calls.append(1) or real(self, *args)
    )
    wrapper = GroupedPunicaWrapperCPU(64, 8, "cpu")
    wrapper.update_metadata(_mapping([1, 2, 0, 1], False), [1, 2, None, None], 5, 1000)
    y = torch.randn(4, 48).bfloat16()
    wrapper.add_lora_linear(y, torch.randn(4, 64).bfloat16(), sa, sb, 1.0, (32, 16))
    assert calls == [1]


@pytest.mark.parametrize("layout", ["grouped", "kernel"])
def test_compiled_layer_reads_each_steps_grouping(layout):
    """The plugin lets vLLM compile the model with LoRA on: the wrapper's call is one custom op
    (torch.ops.tenantlora.lora_linear), so a compiled graph (one graph, no break) must apply
    whatever adapters the current step maps, not the ones it was traced with, and nothing
    for a step without adapters."""
    from serving.cpu_lora.punica import register_layer

    slots, k, outs, rank = 4, 64, (32, 16), 8
    stack = _weights if layout == "grouped" else _compact_weights
    a, b, sa, sb = stack(slots, k, outs, rank, torch.bfloat16, seed=11)
    register_layer(sa, sb, outs)
    wrapper = GroupedPunicaWrapperCPU(64, 8, "cpu")
    reference = PunicaWrapperCPU(64, 8, "cpu")

    def layer(y, x):
        out = y * 1.0  # like the base layer's output: an intermediate the op then updates
        wrapper.add_lora_linear(out, x, sa, sb, 1.0, outs)
        return out + 0.0

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager", dynamic=True)
    gen = torch.Generator().manual_seed(12)
    steps = [[1, 1, 0], [2, 0, 2, 1, 1], [-1, -1], [0, -1, 2, -1]]
    for ids in steps:
        x = torch.randn(len(ids), k, generator=gen).bfloat16()
        y = torch.randn(len(ids), sum(outs), generator=gen).bfloat16()
        lora_ids = [1, 2, 3, None]
        for w in (wrapper, reference):
            w.update_metadata(_mapping([i + 1 if i >= 0 else 0 for i in ids], False), lora_ids,
                              slots + 1, 1000)  # fmt: skip
        got = compiled(y, x)
        want = y.clone()
        reference.add_lora_linear(want, x, a, b, 1.0, outs)
        _assert_close(got, want, y, torch.bfloat16)
        if all(i < 0 for i in ids):
            assert torch.equal(got, y)
        else:
            assert not torch.equal(got, y)

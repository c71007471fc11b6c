"""Grouped (segment) LoRA ops for vLLM's CPU backend.

vLLM's CPU reference (`vllm/lora/ops/torch_ops/lora_ops.py`, `bgmv_*`) gathers a full copy of the
adapter weights for every token (`weights[token_slots]`: T x out x r), converts it to float32 and
einsums it, once per projection slice and per layer. Here the batch is grouped by adapter once per
engine step, and every LoRA layer does one segment matmul per adapter group, with the projections
that share an input (q/k/v, gate/up) stacked so that each layer costs the same few ops whatever
the number of adapters.

Shapes (S adapter slots, T tokens in the step, M <= T of them with an adapter):

- ``token_slots``: (T,) int64, the adapter slot of each token, -1 for none.
- ``TokenGroups.perm``: (M,) int64, the tokens with an adapter, stably sorted by slot.
- ``TokenGroups.offs``: (S,) int32, end (exclusive) of slot s's group in ``perm`` order; the
  slots absent from the step have empty groups.
- ``a_cat``: (S, 1, K, R) float32, the shrink (lora_A) weights of the layer's n slices, stacked on
  the rank axis and stored transposed (matmul-ready): R = n * r, K the input size.
- ``b_cat``: (S, 1, R, N) float32, the expand (lora_B) weights, stored transposed and block
  diagonal: slice i's r rank rows times its output columns (N = sum of the slices' outputs).
- ``x``: (T, K) activations, ``y``: (T, N) the base layer's output, updated in place.

The transposed storage matters: PyTorch's CPU grouped GEMM runs about 2x faster on contiguous
(K, R) operands than on transposed views of (R, K) ones (measured: 70 vs 165 us for 8 groups of
4 tokens x 576 x 48).

Numerics follow the reference step by step: the shrink accumulates in float32 (scaled in float32),
its result is rounded to y's dtype, the expand result is rounded to y's dtype and added to y in
y's dtype. Only the order of the float32 sums differs, so bf16 results are bit-identical in
practice and float32 ones agree to about 1e-6 (tests/cpu_lora states the tolerances).

One deliberate difference: a token with no adapter (slot -1) gets no LoRA delta. vLLM 0.32's CPU
reference indexes the weights with -1, i.e. applies the *last* slot's adapter to such tokens, which
is only harmless while that slot is empty (fewer resident adapters than ``max_loras``).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

__all__ = [
    "StackedLoRA",
    "TokenGroups",
    "group_tokens",
    "grouped_lora_linear",
    "segment_mm",
    "stack_lora_weights",
    "stack_lora_weights_compact",
]


class StackedLoRA(tuple):
    """The per-slice weight tuple vLLM's LoRA layers hold (``lora_a_stacked``/``lora_b_stacked``),
    whose members are views into one stacked tensor, kept in ``.cat``.

    vLLM keeps using the tuple as before (``set_lora``/``reset_lora`` write through the views);
    the grouped op reads ``.cat``.
    """

    cat: torch.Tensor

    def __new__(cls, views, cat: torch.Tensor):
        obj = super().__new__(cls, views)
        obj.cat = cat
        return obj


def _slice_shapes(
    lora_a: tuple[torch.Tensor, ...], lora_b: tuple[torch.Tensor, ...]
) -> tuple[int, int, int, list[int]] | None:
    """(S, r, K, [N_i]) of vLLM's per-slice weights, lora_a[i]: (S, 1, r, K) and lora_b[i]:
    (S, 1, N_i, r); None when the slices disagree."""
    n = len(lora_a)
    if n == 0 or n != len(lora_b):
        return None
    slots, _, r, k = lora_a[0].shape
    if any(a.shape != (slots, 1, r, k) for a in lora_a):
        return None
    if any(b.ndim != 4 or b.shape[:2] != (slots, 1) or b.shape[3] != r for b in lora_b):
        return None
    return slots, r, k, [b.shape[2] for b in lora_b]


def stack_lora_weights(
    lora_a: tuple[torch.Tensor, ...], lora_b: tuple[torch.Tensor, ...]
) -> tuple[StackedLoRA, StackedLoRA] | None:
    """Fresh zeroed float32 storage for a layer's per-slice LoRA weights, stacked for the grouped op.

    lora_a[i]: (S, 1, r, K); lora_b[i]: (S, 1, N_i, r). Returns (transposed) views with the same
    shapes whose ``.cat`` are (S, 1, K, n*r) and the block-diagonal (S, 1, n*r, sum N_i). float32
    storage holds the bf16/fp16 adapter values exactly and spares the op a per-step conversion.
    None when the shapes do not fit this layout (the caller then keeps vLLM's own tensors).
    """
    shapes = _slice_shapes(lora_a, lora_b)
    if shapes is None:
        return None
    slots, r, k, outs = shapes
    n, device = len(outs), lora_a[0].device
    a_cat = torch.zeros(slots, 1, k, n * r, dtype=torch.float32, device=device)
    b_cat = torch.zeros(slots, 1, n * r, sum(outs), dtype=torch.float32, device=device)
    a_views, b_views, col = [], [], 0
    for i, out in enumerate(outs):
        a_views.append(a_cat[:, :, :, i * r : (i + 1) * r].transpose(2, 3))
        b_views.append(b_cat[:, :, i * r : (i + 1) * r, col : col + out].transpose(2, 3))
        col += out
    return StackedLoRA(a_views, a_cat), StackedLoRA(b_views, b_cat)


def stack_lora_weights_compact(
    lora_a: tuple[torch.Tensor, ...], lora_b: tuple[torch.Tensor, ...]
) -> tuple[StackedLoRA, StackedLoRA] | None:
    """Fresh zeroed storage in the weights' own dtype for the fused kernel (serving/cpu_lora/
    lora_kernel.cpp): ``.cat`` of A is (S, 1, K, n*r) as in ``stack_lora_weights``, of B the
    *compact* (S, 1, r, sum N_i): slice i's expand in its own columns, no block-diagonal zeros
    (a third of the bytes for q/k/v). B's tuple also carries ``.cols``: the (n+1,) int64 column
    bounds of the slices. None when the shapes do not fit.
    """
    shapes = _slice_shapes(lora_a, lora_b)
    if shapes is None or any(a.dtype != lora_a[0].dtype for a in lora_a):
        return None
    slots, r, k, outs = shapes
    n, dtype, device = len(outs), lora_a[0].dtype, lora_a[0].device
    a_cat = torch.zeros(slots, 1, k, n * r, dtype=dtype, device=device)
    b_cat = torch.zeros(slots, 1, r, sum(outs), dtype=dtype, device=device)
    bounds = [0, *itertools.accumulate(outs)]
    a_views = [a_cat[:, :, :, i * r : (i + 1) * r].transpose(2, 3) for i in range(n)]
    b_views = [b_cat[:, :, :, bounds[i] : bounds[i + 1]].transpose(2, 3) for i in range(n)]
    b_stacked = StackedLoRA(b_views, b_cat)
    b_stacked.cols = torch.tensor(bounds, dtype=torch.int64)
    return StackedLoRA(a_views, a_cat), b_stacked


@dataclass(frozen=True)
class TokenGroups:
    """Token-to-adapter grouping of one engine step (see the module docstring for shapes).

    ``single`` is the slot when every token uses the same one (then ``perm``/``offs`` are None
    and the op works on the rows in place). ``rows``/``slots``/``ends`` (int64) are the same
    grouping for the fused kernel: the rows with an adapter grouped by slot, and per present
    slot its slot number and the exclusive end of its rows.
    """

    num_tokens: int
    single: int | None
    perm: torch.Tensor | None
    offs: torch.Tensor | None
    rows: torch.Tensor | None = None
    slots: torch.Tensor | None = None
    ends: torch.Tensor | None = None
    max_slot: int = -1


def group_tokens(token_slots: torch.Tensor, num_slots: int) -> TokenGroups | None:
    """Group the step's tokens by adapter slot; None when no token has an adapter."""
    num_tokens = token_slots.numel()
    counts = torch.bincount(token_slots + 1, minlength=num_slots + 1)  # [none, slot 0, ...]
    n_none = int(counts[0])
    if n_none == num_tokens:
        return None
    present = torch.nonzero(counts[1:]).flatten()
    ends = torch.cumsum(counts[1:], 0)
    kernel = {"slots": present, "ends": ends[present].contiguous(), "max_slot": int(present[-1])}
    if n_none == 0 and present.numel() == 1:
        rows = torch.arange(num_tokens, dtype=torch.int64)
        return TokenGroups(num_tokens, int(present[0]), None, None, rows=rows, **kernel)
    perm = torch.argsort(token_slots, stable=True)[n_none:]  # -1 sorts first: drop those
    offs = ends.to(torch.int32)
    return TokenGroups(num_tokens, None, perm, offs, rows=perm.contiguous(), **kernel)


def segment_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """out[rows of group s] = x[rows of group s] @ w[s] for the contiguous groups ending at offs.

    x: (M, K); w: (S, K, N), contiguous per group; offs: (S,) int32 with offs[-1] == M.
    Returns (M, N). One call of PyTorch's grouped GEMM (a loop over the groups in C++, empty
    groups are free).
    """
    return torch._grouped_mm(x, w, offs=offs)


def grouped_lora_linear(
    y: torch.Tensor,
    x: torch.Tensor,
    a_cat: torch.Tensor,
    b_cat: torch.Tensor,
    groups: TokenGroups,
    scale: float = 1.0,
) -> None:
    """y[t, :N] += cast(cast(scale * x[t] @ A[s_t]) @ B[s_t]) for every token t with an adapter.

    x: (T, K), y: (T, N), a_cat: (S, 1, K, R), b_cat: (S, 1, R, N), both float32; ``cast``
    rounds to y.dtype (a no-op for a float32 model). Tokens without an adapter are untouched.
    """
    dtype = y.dtype
    if groups.single is not None:
        h = torch.mm(x.to(torch.float32), a_cat[groups.single, 0])  # (T, R)
    else:
        xs = x.index_select(0, groups.perm).to(torch.float32)  # (M, K), grouped by slot
        h = segment_mm(xs, a_cat[:, 0], groups.offs)  # (M, R)
    if scale != 1.0:
        h.mul_(scale)
    if dtype != torch.float32:
        h = h.to(dtype).to(torch.float32)  # the reference's shrink buffer is rounded to y.dtype
    if groups.single is not None:
        y.add_(torch.mm(h, b_cat[groups.single, 0]).to(dtype))
    else:
        y.index_add_(0, groups.perm, segment_mm(h, b_cat[:, 0], groups.offs).to(dtype))

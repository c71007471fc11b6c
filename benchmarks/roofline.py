"""How close base-only decoding comes to this CPU's matmul rate.

A decode step of a dense decoder multiplies every weight once per sequence in the batch: about
``2 x parameters`` floating-point operations per output token (the tied lm_head included; the
attention over the KV cache is small at these lengths and left out). Output tokens/s times that is
the rate the engine achieves, compared here with torch's measured GEMM rate on this machine with
one thread and with two (float32, and the engine's dtype when it differs).
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class MatmulRate:
    dtype: str
    threads: int
    gflops: float
    shape: tuple[int, int, int]


@dataclass
class Roofline:
    params: int
    flops_per_token: float
    rates: list[MatmulRate] = field(default_factory=list)


_PROBE = r"""
import json, sys, time, torch
dtype, threads, m, k, n = sys.argv[1], int(sys.argv[2]), *map(int, sys.argv[3:6])
torch.set_num_threads(threads)
dt = getattr(torch, dtype)
a = torch.randn(m, k).to(dt); b = torch.randn(k, n).to(dt)
for _ in range(3):
    a @ b
reps, t0 = 0, time.perf_counter()
while time.perf_counter() - t0 < 2.0:
    a @ b
    reps += 1
wall = time.perf_counter() - t0
print(json.dumps({"gflops": 2 * m * k * n * reps / wall / 1e9}))
"""


def matmul_rate(
    dtype: str, threads: int, shape: tuple[int, int, int] = (512, 2048, 2048)
) -> MatmulRate:
    """torch's GEMM rate in a fresh process (so the thread count is exactly ``threads``)."""
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, dtype, str(threads), *map(str, shape)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    return MatmulRate(dtype, threads, json.loads(out.strip().splitlines()[-1])["gflops"], shape)


def model_params(model_dir: Path) -> int:
    """Matmul weights of a Llama-style checkpoint, from its config (tied embeddings counted once,
    norm vectors left out)."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    h, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    heads, kv_heads = (
        cfg["num_attention_heads"],
        cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
    )
    head_dim = cfg.get("head_dim") or h // heads
    attn = h * heads * head_dim * 2 + h * kv_heads * head_dim * 2  # q, o, k, v
    mlp = 3 * h * inter
    embed = cfg["vocab_size"] * h * (1 if cfg.get("tie_word_embeddings") else 2)
    return layers * (attn + mlp) + embed


def measure(model_dir: Path, dtypes: list[str]) -> Roofline:
    params = model_params(model_dir)
    roof = Roofline(params=params, flops_per_token=2.0 * params)
    for dtype in dtypes:
        for threads in (1, 2):
            roof.rates.append(matmul_rate(dtype, threads))
    return roof

"""Benchmark of tenantlora's CPU LoRA plugin (serving/cpu_lora): base model vs LoRA engine with the
plugin off vs on, for 1, 8 and 32 adapters mixed in one batch (32 prompts x 64 tokens, greedy).

The three engines live in three child processes that are started once and then asked in turn,
interleaved and repeated, to run the same workload; so the ratios compare runs taken side by side
on a shared, noisy 2-core machine.

    python -m benchmarks.cpu_lora_bench                 # writes benchmarks/results/cpu_lora.*
    python -m benchmarks.cpu_lora_bench profile --ops 0  # py-spy/torch profile of a mixed decode step
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

BASE_MODEL = os.environ.get("TENANTLORA_BENCH_MODEL", "/tmp/tl-data/models/SmolLM2-135M-Instruct")
WORK_DIR = Path(os.environ.get("TENANTLORA_BENCH_WORK", "/tmp/tl-data/cpu_lora"))
RESULTS = Path(__file__).resolve().parent / "results"
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapters(
    count: int, base_model: str = BASE_MODEL, root: Path = WORK_DIR / "adapters", rank: int = 16
) -> list[Path]:
    """Create (or reuse) ``count`` random-but-nonzero PEFT LoRA adapters (all seven projections).

    Adapter ``i`` is seeded with ``i``; lora_A and lora_B hold N(0, 0.02) values, so every adapter
    changes the model's outputs and costs the engine what a trained one costs.
    """
    root = Path(root)
    paths = [root / f"r{rank}-{i:03d}" for i in range(count)]
    missing = [p for p in paths if not (p / "adapter_model.safetensors").exists()]
    if not missing:
        return paths
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.bfloat16)
    config = LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules=TARGET_MODULES, lora_dropout=0.0
    )
    model = get_peft_model(base, config, autocast_adapter_dtype=False)
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    for path in missing:
        gen = torch.Generator().manual_seed(int(path.name.rsplit("-", 1)[1]))
        with torch.no_grad():
            for p in params:
                p.copy_((torch.randn(p.shape, generator=gen) * 0.02).to(p.dtype))
        model.save_pretrained(str(path))
    return paths


TOPICS = [
    "the history of Rome",
    "how rainbows form",
    "a recipe for bread",
    "the rules of chess",
    "why the sky is blue",
    "how a bicycle works",
    "the life of bees",
    "the water cycle",
    "learning a new language",
    "the first moon landing",
    "how vaccines work",
    "volcanoes",
    "the Pacific Ocean",
    "a day in Paris",
    "saving money",
    "the game of football",
    "photosynthesis",
    "the printing press",
    "black holes",
    "growing tomatoes",
    "jazz music",
    "the Great Wall",
    "how computers store data",
    "desert animals",
    "the Olympic games",
    "writing a poem",
    "electric cars",
    "the human heart",
    "ancient Egypt",
    "climate and weather",
    "the piano",
    "mountain climbing",
]


def prompts(n: int = 32) -> list[str]:
    return [f"Write a short essay about {TOPICS[i % len(TOPICS)]}." for i in range(n)]


def build_llm(lora: bool, max_loras: int = 32, max_model_len: int = 1024):
    """The engine under test; ``lora=False`` is the base model alone."""
    from vllm import LLM

    kwargs: dict = dict(
        model=BASE_MODEL,
        max_model_len=max_model_len,
        dtype="bfloat16",
        gpu_memory_utilization=0.3,
        seed=0,
    )
    if lora:
        kwargs.update(
            enable_lora=True, max_loras=max_loras, max_cpu_loras=max_loras, max_lora_rank=16
        )
    return LLM(**kwargs)


def lora_requests(n_prompts: int, n_adapters: int, paths: list[Path]):
    """Round-robin assignment of ``n_adapters`` adapters to the prompts (0: no adapter at all)."""
    from vllm.lora.request import LoRARequest

    if n_adapters == 0:
        return None
    return [
        LoRARequest(f"a{i % n_adapters}", i % n_adapters + 1, str(paths[i % n_adapters]))
        for i in range(n_prompts)
    ]


def generate(llm, n_adapters: int, paths: list[Path], tokens: int = 64, n_prompts: int = 32):
    """One timed ``generate`` call; returns (output tokens/s, seconds, token ids)."""
    from vllm import SamplingParams

    sp = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    reqs = lora_requests(n_prompts, n_adapters, paths)
    t0 = time.perf_counter()
    outs = llm.generate(prompts(n_prompts), sp, lora_request=reqs, use_tqdm=False)
    dt = time.perf_counter() - t0
    ids = [list(o.outputs[0].token_ids) for o in outs]
    return sum(len(i) for i in ids) / dt, dt, ids


def _frame(frame: str) -> str:
    """'func (path/to/file.py:123)' -> 'func (file.py)': aggregate a function over its lines."""
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rsplit(':', 1)[0].rsplit('/', 1)[-1].rstrip(')')})"


def summarize_pyspy(raw: str, top: int = 15) -> dict:
    """Self and inclusive sample shares per function from py-spy's raw (collapsed) output."""
    from collections import Counter

    self_c, incl_c, total = Counter(), Counter(), 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_frame(f) for f in stack.split(";")]
        total += n
        self_c[frames[-1]] += n
        for f in set(frames):
            incl_c[f] += n
    share = lambda c: [(f, round(100 * n / total, 1)) for f, n in c.most_common(top)]  # noqa: E731
    return {"samples": total, "self": share(self_c), "inclusive": share(incl_c)}


def profile(n_adapters: int, tokens: int = 64) -> dict:
    """py-spy profile (sampling, in this process) of one 32-prompt generate call, mixed adapters.

    Run with the engine in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0, set by ``main``); the
    plugin is on or off as TENANTLORA_CPU_LORA_OPS says.
    """
    import signal
    import subprocess
    import tempfile

    paths = make_adapters(max(n_adapters, 1))
    llm = build_llm(lora=n_adapters > 0)
    generate(llm, n_adapters, paths, tokens=8)  # warm-up: loads the adapters
    out = Path(tempfile.mkdtemp()) / "pyspy.txt"
    spy = subprocess.Popen(
        ["py-spy", "record", "--pid", str(os.getpid()), "--format", "raw", "--rate", "100",
         "--nonblocking", "-o", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    time.sleep(2)
    tps, dt, _ = generate(llm, n_adapters, paths, tokens=tokens)
    spy.send_signal(signal.SIGINT)
    spy.wait(timeout=120)
    summary = summarize_pyspy(out.read_text())
    summary.update(adapters=n_adapters, ops=os.environ.get("TENANTLORA_CPU_LORA_OPS", "1"),
                   tok_s=round(tps, 1), seconds=round(dt, 2))  # fmt: skip
    return summary


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd")
    p = sub.add_parser("profile")
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--ops", choices=["0", "1"], default="1", help="plugin off (0) or on (1)")
    p.add_argument("--out", type=Path, default=None, help="write the summary (JSON) here")
    args = ap.parse_args()
    if args.cmd == "profile":
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine in this process, for py-spy
        os.environ["TENANTLORA_CPU_LORA_OPS"] = args.ops
        summary = profile(args.adapters)
        text = json.dumps(summary, indent=1)
        print(text)
        if args.out:
            args.out.write_text(text)


if __name__ == "__main__":
    main()

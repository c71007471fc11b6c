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


def profile(n_adapters: int, out: Path, tokens: int = 64) -> str:
    """torch.profiler table (top ops by self CPU time) of a mixed-adapter generate call."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    paths = make_adapters(max(n_adapters, 1))
    llm = build_llm(lora=True)
    generate(llm, n_adapters, paths, tokens=8)  # warm-up: loads the adapters
    with tprofile(activities=[ProfilerActivity.CPU]) as prof:
        tps, dt, _ = generate(llm, n_adapters, paths, tokens=tokens)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
    text = f"{n_adapters} adapters, {tps:.0f} tok/s under the profiler ({dt:.1f} s)\n{table}"
    out.write_text(text)
    return text


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd")
    p = sub.add_parser("profile")
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--out", type=Path, default=Path("/tmp/cpu_lora_profile.txt"))
    args = ap.parse_args()
    if args.cmd == "profile":
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine in this process
        print(profile(args.adapters, args.out))


if __name__ == "__main__":
    main()

"""Benchmark of tenantlora's CPU LoRA plugin (serving/cpu_lora): base model vs LoRA engine with the
plugin off vs on, for 1, 8 and 32 adapters mixed in one batch (32 prompts x 64 tokens, greedy).

The three engines live in three child processes that are started once and then asked in turn,
interleaved and repeated, to run the same workload; so the ratios compare runs taken side by side
on a shared, noisy 2-core machine.

    tenantlora bench cpu-lora run                # writes benchmarks/results/cpu_lora.*
    tenantlora bench cpu-lora profile --ops 0    # py-spy profile of a mixed-adapter generate call
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import sys
import time
from pathlib import Path

from adapters.targets import LORA_TARGET_MODULES

BASE_MODEL = os.environ.get("TENANTLORA_BENCH_MODEL")
WORK_DIR = Path(os.environ.get("TENANTLORA_BENCH_WORK", "/tmp/tenantlora-bench/cpu_lora"))
RESULTS = Path(__file__).resolve().parent / "results"


@functools.cache
def engine_dtype() -> str:
    """TENANTLORA_BENCH_DTYPE, else what `tenantlora serve` picks on this machine (float32 on
    CPUs without native bf16)."""
    from serving.hardware import resolve_dtype

    return os.environ.get("TENANTLORA_BENCH_DTYPE") or resolve_dtype("auto", gpu=False)


def make_adapters(count: int, rank: int = 16) -> list[Path]:
    """``count`` random-but-nonzero rank-16 PEFT adapters on all seven projections (cached)."""
    from benchmarks.adapters_fixture import make_adapters as make

    return list(make(base_model(), WORK_DIR, count, rank=rank).values())


def base_model() -> str:
    """TENANTLORA_BENCH_MODEL, else the server's base model (TENANTLORA_BASE_MODEL, by default
    the embedded SmolLM2), resolved as `tenantlora serve` resolves it."""
    from serving.base_model import resolve_base_model
    from serving.settings import Settings

    settings = Settings()
    return str(resolve_base_model(BASE_MODEL or settings.base_model, settings.models_dir))


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
    """The engine under test, with the server's engine arguments (serving.engine.engine_kwargs);
    ``lora=False`` is the base model alone."""
    from vllm import LLM

    from serving.engine import engine_kwargs
    from serving.settings import Settings

    # enforce_eager for all three: vLLM runs every LoRA engine eager on the CPU anyway
    # (platforms/cpu.py sets CompilationMode.NONE with LoRA), so the base is compared like for
    # like; compiled, it was no faster (FACTS.md: 515 tok/s vs 526 LoRA-enabled, eager).
    settings = Settings(
        max_model_len=max_model_len,
        dtype=engine_dtype(),
        memory_share=0.3,
        enforce_eager=True,
        max_loras=max_loras,
        max_cpu_loras=max_loras,
        max_lora_rank=16,
    )
    kwargs = engine_kwargs(settings, base_model(), lora=lora)
    # An offline benchmark: a fixed seed, and no periodic stats logging in the timed calls.
    return LLM(**{**kwargs, "seed": 0, "disable_log_stats": True})


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
    # Inclusive: leave out the call chain every sample shares (generate -> ... -> model forward).
    incl_c = Counter({f: n for f, n in incl_c.items() if n < 0.95 * total})
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
        [shutil.which("py-spy", path=str(Path(sys.executable).parent)) or "py-spy", "record", "--pid", str(os.getpid()), "--format", "raw", "--rate", "100",
         "--nonblocking", "-o", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    time.sleep(2)
    tps, dt, _ = generate(llm, n_adapters, paths, tokens=tokens)
    spy.send_signal(signal.SIGINT)
    spy.wait(timeout=120)
    summary = summarize_pyspy(out.read_text())
    summary.update(adapters=n_adapters, tokens=tokens, ops=os.environ.get("TENANTLORA_CPU_LORA_OPS", "1"),
                   tok_s=round(tps, 1), seconds=round(dt, 2))  # fmt: skip
    return summary


def op_bench(adapter_counts: list[int], repeats: int = 3, tokens: int = 32) -> list[dict]:
    """Op-level side-by-side timing of one decode step's linear work (no engine, one thread).

    Per step, 30 Llama layers of SmolLM2-135M's shapes (qkv 576->960, o 576->576, gate_up
    576->3072, down 1536->576) plus the lm_head, in bf16 through ``F.linear`` (what vLLM uses on
    this machine, whose oneDNN path is unavailable), for ``tokens`` tokens; then the same plus
    the LoRA work (r=16 on all seven projections, tokens spread round-robin over the adapters,
    32 slots) through vLLM's ``PunicaWrapperCPU`` (plugin off) or the plugin's wrapper (on).
    base / (base + LoRA) is a lower bound of the engine's ratio: attention, norms and the
    scheduler cost the same in all three and are left out.
    """
    import statistics

    import torch
    import torch.nn.functional as F
    from vllm.lora.layers import LoRAMapping
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    from serving.cpu_lora.ops import stack_lora_weights
    from serving.cpu_lora.punica import GroupedPunicaWrapperCPU

    torch.manual_seed(0)
    bf16, slots, r, hidden = torch.bfloat16, 32, 16, 576
    layers = [(hidden, (576, 192, 192)), (hidden, (576,)), (hidden, (1536, 1536)), (1536, (576,))]
    weights, lora_ref, lora_new = [], [], []
    for _ in range(30):
        for k, outs in layers:
            weights.append((torch.randn(sum(outs), k) * 0.02).to(bf16))
            a = tuple((torch.randn(slots, 1, r, k) * 0.02).to(bf16) for _ in outs)
            b = tuple((torch.randn(slots, 1, n, r) * 0.02).to(bf16) for n in outs)
            sa, sb = stack_lora_weights(a, b)
            for i in range(len(outs)):
                sa[i].copy_(a[i])
                sb[i].copy_(b[i])
            lora_ref.append((a, b, outs))
            lora_new.append((sa, sb, outs))
    lm_head = (torch.randn(49152, hidden) * 0.02).to(bf16)
    xs = {k: torch.randn(tokens, k).to(bf16) for k in (576, 1536)}

    def step(wrapper, loras):
        for i, w in enumerate(weights):
            x = xs[w.shape[1]]
            y = F.linear(x, w)
            if wrapper is not None:
                a, b, outs = loras[i]
                wrapper.add_lora_linear(y, x, a, b, 1.0, outs)
        F.linear(xs[576], lm_head)

    results = []
    for n in adapter_counts:
        ids = tuple(i % n + 1 for i in range(tokens))
        mapping = LoRAMapping(ids, ids, is_prefill=True)  # as vLLM V1 sets it
        wrappers = {}
        for name, cls in (("off", PunicaWrapperCPU), ("on", GroupedPunicaWrapperCPU)):
            w = cls(8192, 256, "cpu")
            w.update_metadata(mapping, list(range(1, slots + 1)), slots + 1, 49152)
            wrappers[name] = w
        times = {"base": [], "off": [], "on": []}
        for _ in range(repeats):
            for name, wrapper, loras in (
                ("base", None, None), ("off", wrappers["off"], lora_ref),
                ("on", wrappers["on"], lora_new),
            ):  # fmt: skip
                t0 = time.perf_counter()
                if name == "on":  # the per-step grouping is part of the plugin's cost
                    wrapper.update_metadata(mapping, list(range(1, slots + 1)), slots + 1, 49152)
                step(wrapper, loras)
                times[name].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        results.append({
            "adapters": n, "tokens": tokens,
            **{f"{k}_ms": round(1000 * v, 1) for k, v in med.items()},
            "off_vs_base": round(med["base"] / med["off"], 3),
            "on_vs_base": round(med["base"] / med["on"], 3),
        })  # fmt: skip
        print(json.dumps(results[-1]), flush=True)
    return results


def write_profile_md(before: dict, after: dict, out: Path) -> None:
    """benchmarks/results/cpu_lora_profile.md from two ``profile`` summaries (plugin off, on)."""
    lines = [
        "# Profile of a mixed-adapter generate call: plugin off (before) vs on (after)",
        "",
        "py-spy (100 Hz, Python frames) of one `generate` of 32 prompts x "
        f"{before.get('tokens', 64)} tokens over {before['adapters']} adapters, engine in-process, "
        "after a warm-up call. Shares are of all samples of the call.",
        "",
    ]
    for title, s in (("Before (plugin off)", before), ("After (plugin on)", after)):
        lines += [f"## {title}: {s['tok_s']} tok/s under the profiler, {s['samples']} samples", ""]
        for kind, head in (("self", "self time (leaf frame)"), ("inclusive", "inclusive time")):
            lines += [f"| function | {head} % |", "|---|---|"]
            lines += [f"| `{f}` | {v} |" for f, v in s[kind]]
            lines.append("")
    out.write_text("\n".join(lines))


KINDS = ("base", "off", "on")  # base model alone; LoRA engine with the plugin off; with it on


def serve_engine(kind: str) -> None:
    """Child process: build one engine, then answer JSON-line requests on stdin until EOF."""
    import sys

    paths = make_adapters(32)
    llm = build_llm(lora=kind != "base")
    print("READY", flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        n = 0 if kind == "base" else req["adapters"]
        tps, dt, ids = generate(llm, n, paths, tokens=req["tokens"])
        print("RESULT " + json.dumps({"tok_s": tps, "seconds": dt, "ids": ids}), flush=True)


class Engine:
    """An engine in a child process (its own TENANTLORA_CPU_LORA_OPS), driven over pipes."""

    def __init__(self, kind: str, log_dir: Path):
        import subprocess
        import sys

        env = dict(os.environ, TENANTLORA_CPU_LORA_OPS="0" if kind == "off" else "1")
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; 32 x 80 tokens need far less
        self.kind = kind
        self.log = open(log_dir / f"cpu_lora_engine_{kind}.log", "w")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "serving.cli", "bench", "cpu-lora", "serve-engine", kind],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env,
        )  # fmt: skip
        self._read("READY")

    def _read(self, prefix: str) -> str:
        for line in self.proc.stdout:
            if line.startswith(prefix):
                return line[len(prefix) :].strip()
            self.log.write(line)
        raise RuntimeError(f"engine {self.kind} exited; see {self.log.name}")

    def run(self, adapters: int, tokens: int) -> dict:
        self.proc.stdin.write(json.dumps({"adapters": adapters, "tokens": tokens}) + "\n")
        self.proc.stdin.flush()
        return json.loads(self._read("RESULT "))

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=120)
        self.log.close()


def bench(adapter_counts: list[int], repeats: int, tokens: int, out_dir: Path) -> dict:
    """Interleaved base/off/on runs; ratios are taken within one round (runs side by side)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    make_adapters(32)
    engines = {k: Engine(k, Path("/tmp")) for k in KINDS}
    rows = []
    try:
        for k in KINDS:  # warm-up: first generate, adapter loading
            for n in adapter_counts:
                engines[k].run(n, 4)
        for r in range(repeats):
            for n in adapter_counts:
                order = KINDS if r % 2 == 0 else tuple(reversed(KINDS))
                res = {k: engines[k].run(n, tokens) for k in order}
                same = res["on"]["ids"] == res["off"]["ids"]
                rows.append({"round": r, "adapters": n, "same_outputs_on_off": same,
                             **{f"{k}_tok_s": round(res[k]["tok_s"], 1) for k in KINDS}})  # fmt: skip
                print(json.dumps(rows[-1]), flush=True)
    finally:
        for e in engines.values():
            e.close()
    return summarize(rows, tokens, repeats)


def summarize(rows: list[dict], tokens: int, repeats: int) -> dict:
    """Medians over the rounds, per adapter count; ratios are taken within each round."""
    import statistics

    summary = []
    for n in sorted({x["adapters"] for x in rows}):
        rs = [x for x in rows if x["adapters"] == n]
        med = lambda key, rs=rs: round(statistics.median(key(x) for x in rs), 3)  # noqa: E731
        summary.append(
            {
                "adapters": n,
                "rounds": len(rs),
                "base_tok_s": med(lambda x: x["base_tok_s"]),
                "off_tok_s": med(lambda x: x["off_tok_s"]),
                "on_tok_s": med(lambda x: x["on_tok_s"]),
                "off_vs_base": med(lambda x: x["off_tok_s"] / x["base_tok_s"]),
                "on_vs_base": med(lambda x: x["on_tok_s"] / x["base_tok_s"]),
                "on_vs_off": med(lambda x: x["on_tok_s"] / x["off_tok_s"]),
                "same_outputs_on_off": all(x["same_outputs_on_off"] for x in rs),
            }
        )
    config = {"prompts": 32, "tokens": tokens, "repeats": repeats, "max_loras": 32, "rank": 16,
              "modules": list(LORA_TARGET_MODULES), "dtype": engine_dtype(), "enforce_eager": True}  # fmt: skip
    return {"config": config, "rounds": rows, "summary": summary}


def write_report(result: dict, out_dir: Path) -> None:
    (out_dir / "cpu_lora.json").write_text(json.dumps(result, indent=1))
    lines = [
        "# CPU LoRA plugin: base vs plugin off vs plugin on",
        "",
        f"vLLM 0.32 CPU, SmolLM2-135M {result['config']['dtype']}, 32 prompts x {result['config']['tokens']} tokens "
        f"greedy, r=16 adapters on all 7 projections, max_loras=32, "
        f"{result['config']['repeats']} interleaved rounds (medians; ratios within a round).",
        "",
        "| adapters in the batch | base tok/s | off tok/s | on tok/s | off / base | on / base "
        "| on / off | outputs on == off |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in result["summary"]:
        lines.append(
            f"| {s['adapters']} | {s['base_tok_s']:.0f} | {s['off_tok_s']:.0f} | "
            f"{s['on_tok_s']:.0f} | {s['off_vs_base']:.2f} | {s['on_vs_base']:.2f} | "
            f"{s['on_vs_off']:.2f} | {'yes' if s['same_outputs_on_off'] else 'NO'} |"
        )
    (out_dir / "cpu_lora.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    xs = range(len(result["summary"]))
    for i, (key, label) in enumerate([("off_vs_base", "plugin off"), ("on_vs_base", "plugin on")]):
        ax.bar([x + 0.38 * i for x in xs], [s[key] for s in result["summary"]], 0.38, label=label)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xticks([x + 0.19 for x in xs], [f"{s['adapters']} adapters" for s in result["summary"]])
    ax.set_ylabel("output tok/s vs base model")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "cpu_lora.png", dpi=120)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The subcommands and flags of `tenantlora bench cpu-lora`."""
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("profile", help="py-spy profile of one mixed-adapter generate call")
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--ops", choices=["0", "1"], default="1", help="plugin off (0) or on (1)")
    p.add_argument("--out", type=Path, default=None, help="write the summary (JSON) here")
    e = sub.add_parser("serve-engine", help="(used by run) one engine answering on stdin")
    e.add_argument("kind", choices=KINDS)
    o = sub.add_parser("ops", help="op-level timing of one decode step (no engine)")
    o.add_argument("--adapters", type=int, nargs="+", default=[1, 8, 32])
    o.add_argument("--repeats", type=int, default=3)
    f = sub.add_parser("report-from-log", help="rebuild the report from a run's printed rounds")
    f.add_argument("log", type=Path)
    f.add_argument("--tokens", type=int, default=64)
    r = sub.add_parser("profile-report", help="cpu_lora_profile.md from two profiles")
    r.add_argument("before", type=Path)
    r.add_argument("after", type=Path)
    b = sub.add_parser("run", help="base / plugin off / plugin on, interleaved rounds")
    b.add_argument("--adapters", type=int, nargs="+", default=[1, 8, 32])
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--tokens", type=int, default=64)
    b.add_argument("--out-dir", type=Path, default=RESULTS)


def cli(args: argparse.Namespace) -> int:
    """Run the `tenantlora bench cpu-lora` subcommand ``args.cmd``."""
    if args.cmd == "ops":
        import torch

        torch.set_num_threads(1)  # as vLLM's CPU worker runs here (it reduces 2 -> 1 thread)
        res = op_bench(args.adapters, args.repeats)
        (RESULTS / "cpu_lora_ops.json").write_text(json.dumps(res, indent=1))
    elif args.cmd == "report-from-log":
        rows = [
            json.loads(ln) for ln in args.log.read_text().splitlines() if ln.startswith('{"round"')
        ]
        result = summarize(rows, args.tokens, 1 + max(x["round"] for x in rows))
        write_report(result, RESULTS)
        print((RESULTS / "cpu_lora.md").read_text())
    elif args.cmd == "profile-report":
        before, after = (json.loads(p.read_text()) for p in (args.before, args.after))
        write_profile_md(before, after, RESULTS / "cpu_lora_profile.md")
    elif args.cmd == "serve-engine":
        serve_engine(args.kind)
    elif args.cmd == "run":
        result = bench(args.adapters, args.repeats, args.tokens, args.out_dir)
        write_report(result, args.out_dir)
        print((args.out_dir / "cpu_lora.md").read_text())
    elif args.cmd == "profile":
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine in this process, for py-spy
        os.environ["TENANTLORA_CPU_LORA_OPS"] = args.ops
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB
        summary = profile(args.adapters, args.tokens)
        text = json.dumps(summary, indent=1)
        print(text)
        if args.out:
            args.out.write_text(text)
    return 0

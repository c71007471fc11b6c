"""`tenantlora bench ...` subcommands: `run` (every serving scenario side by side, then the
report), `load` (the load generator against any OpenAI-compatible endpoint), `report` (rewrite a
results file's report), `cpu-lora` (the CPU LoRA-ops benchmark), `peft-server` (the transformers +
PEFT peer the benchmark starts)."""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import get_args

from serving.settings import Settings

log = logging.getLogger(__name__)

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def run_command(args: argparse.Namespace) -> int:
    """Run the whole benchmark and write the report."""
    from benchmarks.benchmark import plugin_installed, run_benchmark
    from benchmarks.config import BenchConfig
    from benchmarks.report import write_report
    from serving.base_model import resolve_base_model
    from serving.settings import Settings

    models_dir = Path(args.models_dir) if args.models_dir else Settings().models_dir
    base = str(resolve_base_model(args.base_model, models_dir))
    work_dir = Path(args.work_dir).expanduser().resolve()
    out_dir = Path(args.out_dir).expanduser().resolve()
    overrides: dict[str, object] = {}
    for key in (
        "requests",
        "concurrency",
        "max_tokens",
        "merged_count",
        "peft_requests",
        "peft_threads",
        "zipf",
        "kv_cache_gib",
        "rate_requests",
        "duration",
        "time_budget",
        "enforce_eager",
        "name",
        "max_loras",
        "lora_dtype",
        "single_requests",
        "rounds",
        "llama_cpp_python",
        "llamacpp_requests",
        "max_load",
        "quiet_wait_s",
    ):
        value = getattr(args, key)
        if value is not None:
            overrides[key] = value
    if args.adapters:
        overrides["adapter_counts"] = [int(x) for x in args.adapters.split(",")]
    if args.rates:
        overrides["rates"] = [float(x) for x in args.rates.split(",")]
    if args.peers is not None:
        overrides["peers"] = [x for x in args.peers.split(",") if x]
    if args.server == "tenantlora" and not args.quick and args.lora_ops != "default":
        overrides["lora_ops_variants"] = (
            [True, False]
            if args.lora_ops == "both" and plugin_installed()
            else [args.lora_ops == "on"]
        )
    common = dict(base_model=base, work_dir=work_dir, out_dir=out_dir, server=args.server)
    cfg = (
        BenchConfig.quick_preset(**common, **overrides)
        if args.quick
        else BenchConfig(**common, **overrides)
    )
    cfg.lora_dtype = cfg.engine_lora_dtype()  # recorded as resolved
    logging.getLogger("httpx").setLevel(logging.WARNING)
    results = run_benchmark(cfg)
    for kind, path in write_report(results, out_dir).items():
        print(f"{kind}: {path}")
    print(json.dumps({k: g.value for k, g in results.analysis.goals.items()}, indent=1))
    return 1 if results.errors else 0


def positive_int(value: str) -> int:
    """argparse type: an integer of at least 1."""
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return number


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="CI smoke size (a few minutes)")
    parser.add_argument(
        "--base-model",
        default="smollm2-135m-instruct",
        help="Embedded name, local checkpoint folder or hub id",
    )
    parser.add_argument("--models-dir", help="Where the embedded base model is prepared")
    parser.add_argument(
        "--server",
        choices=["tenantlora", "vllm"],
        default="tenantlora",
        help="Shared-base server under test (vllm: vLLM's own server)",
    )
    parser.add_argument(
        "--work-dir",
        default="/tmp/tenantlora-bench",
        help="Adapters, merged models and server logs (cached between runs)",
    )
    parser.add_argument("--out-dir", default=str(RESULTS_DIR), help="Where the report goes")
    parser.add_argument("--name", help="Report file prefix (default serving_benchmark[_quick])")
    parser.add_argument("--adapters", help="Adapter counts, e.g. 1,8,32,128")
    parser.add_argument("--rates", help="Poisson rates for the latency-vs-load sweep, e.g. 0.5,1,2")
    parser.add_argument("--requests", type=int, help="Requests per closed-loop run")
    parser.add_argument("--concurrency", type=int)
    parser.add_argument(
        "--time-budget", type=float, help="Seconds; skip later LoRA-ops variants past it"
    )
    parser.add_argument("--rate-requests", type=int, help="Requests per Poisson-rate run")
    parser.add_argument("--duration", type=float, help="Bound of each load run (s)")
    parser.add_argument("--max-tokens", type=int)
    parser.add_argument("--zipf", type=float)
    parser.add_argument("--kv-cache-gib", type=float, help="KV cache of every engine (GiB)")
    parser.add_argument("--merged-count", type=int, help="Merged-model engines to start")
    parser.add_argument("--peft-requests", type=int)
    parser.add_argument("--peft-threads", type=int, help="torch threads of the PEFT peer")
    parser.add_argument(
        "--enforce-eager",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Start every vLLM engine without torch.compile (default: on with --quick only)",
    )
    parser.add_argument(
        "--lora-ops",
        choices=["both", "on", "off", "default"],
        default="default",
        help="CPU LoRA-ops plugin variants of our server to run (default: the server's default)",
    )
    parser.add_argument(
        "--peers",
        help="Comma-separated peers run in the same invocation: vllm (vllm serve at every N), "
        "peft (transformers+PEFT), llamacpp (llama.cpp's server); default all; '' for none",
    )
    parser.add_argument("--max-loras", type=int, help="Every engine's max_loras (default: ours)")
    parser.add_argument(
        "--lora-dtype",
        choices=get_args(Settings.model_fields["lora_dtype"].annotation),
        help="Every vLLM engine's lora_dtype (default: bfloat16 under a float32 model, the "
        "adapters being bf16; else the model's)",
    )
    parser.add_argument("--single-requests", type=int, help="Requests of the one-alone runs")
    parser.add_argument(
        "--rounds",
        type=positive_int,
        help="Interleaved repeats of the adapter sweep (medians reported)",
    )
    parser.add_argument(
        "--llama-cpp-python",
        help="A Python with llama-cpp-python[server] (default: $TENANTLORA_LLAMA_CPP_PYTHON)",
    )
    parser.add_argument("--llamacpp-requests", type=int, help="Requests of llama.cpp's run")
    parser.add_argument(
        "--max-load", type=float, help="Load average above which a run is flagged (1.5)"
    )
    parser.add_argument(
        "--quiet-wait-s", type=float, help="Wait up to this long for a quiet machine at start"
    )


def add_peft_server_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of the PEFT peer (here, so `tenantlora --help` needs no torch import)."""
    parser.add_argument("--base-model", required=True)
    parser.add_argument("--served-model-name", default="base")
    parser.add_argument("--lora", action="append", default=[], metavar="NAME=PATH")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8200)


def peft_server_command(args: argparse.Namespace) -> int:
    from benchmarks.peft_server import serve

    return serve(args)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `bench run|load|report|cpu-lora|peft-server` to the `tenantlora` command line."""
    from benchmarks import cpu_lora_bench, load, noisy_neighbour, overhead, report

    bench = subparsers.add_parser("bench", help="Load generator and serving benchmarks")
    sub = bench.add_subparsers(dest="bench_command", required=True)
    # name -> (help, module docstring, add_arguments, command)
    commands: dict[str, tuple[str, str | None, Callable, Callable]] = {
        "run": (
            "Run every serving scenario side by side and write the report",
            __doc__,
            add_run_arguments,
            run_command,
        ),
        "load": (
            "Drive an OpenAI-compatible endpoint with bounded load",
            load.__doc__,
            load.add_arguments,
            load.cli,
        ),
        "report": (
            "Rewrite a results file's Markdown and plots (with --note)",
            report.__doc__,
            report.add_arguments,
            report.cli,
        ),
        "cpu-lora": (
            "Benchmark the CPU LoRA-ops plugin (base / off / on engines)",
            cpu_lora_bench.__doc__,
            cpu_lora_bench.add_arguments,
            cpu_lora_bench.cli,
        ),
        "noisy-neighbour": (
            "A victim tenant's latency alone and during another's flood (fair, FCFS, vllm serve)",
            noisy_neighbour.__doc__,
            noisy_neighbour.add_arguments,
            noisy_neighbour.cli,
        ),
        "overhead": (
            "The tenant layer's cost: tenantlora (SQLite, PostgreSQL) vs vllm serve, base only",
            overhead.__doc__,
            overhead.add_arguments,
            overhead.cli,
        ),
        "peft-server": (
            "The transformers + PEFT peer server (started by `bench run`)",
            "The transformers + PEFT peer (benchmarks/peft_server.py).",
            add_peft_server_arguments,
            peft_server_command,
        ),
    }
    for name, (help_text, description, add_arguments, command) in commands.items():
        parser = sub.add_parser(
            name,
            help=help_text,
            description=description,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        add_arguments(parser)
        parser.set_defaults(func=command)

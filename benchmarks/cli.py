"""`tenantlora bench ...` subcommands: `load` (the load generator against any OpenAI-compatible
endpoint) and `run` (every scenario side by side, then the report)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from benchmarks import load as load_mod

log = logging.getLogger(__name__)

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _resolve_base_model(spec: str, models_dir: str | None) -> str:
    from serving.base_model import resolve_base_model
    from serving.settings import Settings

    root = Path(models_dir) if models_dir else Settings().models_dir
    return str(resolve_base_model(spec, root))


def run_command(args: argparse.Namespace) -> int:
    """Run the whole benchmark and write the report."""
    from benchmarks.report import write_report
    from benchmarks.scenarios import Bench, BenchConfig, plugin_installed

    base = _resolve_base_model(args.base_model, args.models_dir)
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
        "only",
    ):
        value = getattr(args, key)
        if value is not None:
            overrides[key] = value
    if args.adapters:
        overrides["adapter_counts"] = [int(x) for x in args.adapters.split(",")]
    if args.rates:
        overrides["rates"] = [float(x) for x in args.rates.split(",")]
    if args.server == "tenantlora" and not args.quick and args.lora_ops != "default":
        overrides["lora_ops_variants"] = (
            [True, False]
            if args.lora_ops == "both" and plugin_installed()
            else [args.lora_ops == "on"]
        )
    if args.enforce_eager is not None:
        overrides["enforce_eager"] = args.enforce_eager
    if args.name:
        overrides["name"] = args.name
    common = dict(base_model=base, work_dir=work_dir, out_dir=out_dir, server=args.server)
    cfg = (
        BenchConfig.quick_preset(**common, **overrides)
        if args.quick
        else BenchConfig(**common, **overrides)
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    results = Bench(cfg).run()
    paths = write_report(results, out_dir)
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    print(json.dumps(results["analysis"]["goals"], indent=1))
    return 1 if results["errors"] else 0


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
    parser.add_argument(
        "--only", choices=["monolithic"], help="Run just this scenario (merge it with --merge-from)"
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
        default="both",
        help="CPU LoRA-ops plugin variants of our server to run",
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `bench load` and `bench run` to the `tenantlora` command line."""
    bench = subparsers.add_parser("bench", help="Load generator and serving benchmark")
    sub = bench.add_subparsers(dest="bench_command", required=True)
    p_load = sub.add_parser(
        "load",
        help="Drive an OpenAI-compatible endpoint with bounded load",
        description=load_mod.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    load_mod.add_arguments(p_load)
    p_load.set_defaults(func=load_mod.cli)
    p_run = sub.add_parser(
        "run", help="Run every scenario side by side and write the report", description=__doc__
    )
    add_run_arguments(p_run)
    p_run.set_defaults(func=run_command)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cli")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

"""`tenantlora train | merge | eval | data` subcommands (`train results`: the method x task
table)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from adapters.targets import LORA_TARGET_MODULES
from training.config import DEFAULT_LEARNING_RATE, METHODS


def _default_base() -> str:
    from serving.settings import Settings

    return Settings().base_model


def _pairs(values: list[str] | None, flag: str) -> dict[str, str]:
    out = {}
    for value in values or []:
        task, sep, path = value.partition("=")
        if not sep or not task or not path:
            raise SystemExit(f"{flag} expects TASK=PATH, got {value!r}")
        out[task] = path
    return out


def cmd_train(args: argparse.Namespace) -> int:
    from training.config import TrainConfig
    from training.data import DataError
    from training.trainer import TrainingError, train

    cfg = TrainConfig(
        method=args.method,
        base=args.base,
        data=args.data,
        out=args.out,
        eval_data=args.eval_data,
        learning_rate=args.lr,
        max_steps=args.max_steps,
        epochs=args.epochs,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        max_length=args.max_length,
        seed=args.seed,
        gradient_checkpointing=args.gradient_checkpointing,
        logging_steps=args.logging_steps,
        eval_before=not args.skip_eval_before,
        lora_r=args.rank,
        lora_alpha=args.alpha,
        lora_dropout=args.dropout,
        target_modules=tuple(args.target_modules.split(",")),
        threads=args.threads,
        save_dtype=args.save_dtype,
    )
    if getattr(args, "search", False):
        from training.search import SearchError, run_from_args

        try:
            result = run_from_args(cfg, args)
        except (DataError, TrainingError, SearchError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(json.dumps({k: result.report[k] for k in ("chosen", "within_budget", "note")}))
        return 0
    try:
        report = train(cfg)
    except (DataError, TrainingError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in vars(report).items() if k != "config"}, indent=2))
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from training.merge import MergeError, merge

    try:
        report = merge(
            Path(args.adapter),
            Path(args.out),
            base=args.base,
            dtype=args.dtype,
            fmt=args.format,
            gguf_dtype=args.gguf_dtype,
        )
    except MergeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(vars(report), indent=2))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    if args.harness:
        from training.harness_eval import cmd_harness

        return cmd_harness(args)
    if not args.data:
        raise SystemExit("tenantlora eval: --data is required (except with --harness)")
    from serving.base_model import resolve_base_model
    from serving.settings import Settings
    from training.evaluate import EvalPlan, evaluate, summarize
    from training.tasks import TASK_NAMES

    plan = EvalPlan(
        base=str(resolve_base_model(args.base, Settings().models_dir)),
        data_dir=Path(args.data),
        tasks=(args.tasks or ",".join(TASK_NAMES)).split(","),
        adapters={
            k: v
            for k, v in (
                ("lora", _pairs(args.lora, "--lora")),
                ("qlora", _pairs(args.qlora, "--qlora")),
            )
            if v
        },
        checkpoints={
            k: v
            for k, v in (
                ("full", _pairs(args.full, "--full")),
                ("merged", _pairs(args.merged, "--merged")),
            )
            if v
        },
        max_lora_rank=args.max_lora_rank,
        memory_share=args.memory_share,
        kv_cache_gib=args.kv_cache_gib,
        enforce_eager=args.enforce_eager,
        include_base=not args.skip_base,
        dtype=args.dtype,
    )
    cells = evaluate(plan)
    result = {"summary": summarize(cells), "cells": [vars(c) for c in cells]}
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(json.dumps(result["summary"], indent=2))
    return 0


def cmd_eval_engine(args: argparse.Namespace) -> int:
    from training.evaluate import run_spec_file

    run_spec_file(args.spec, args.out)
    return 0


def cmd_data_generate(args: argparse.Namespace) -> int:
    from training.tasks import generate_all

    paths = generate_all(
        Path(args.out),
        n_train=args.n_train,
        n_eval=args.n_eval,
        seed=args.seed,
        tasks=tuple(args.tasks.split(",")),
    )
    for task, splits in paths.items():
        for split, path in splits.items():
            print(f"{task:8s} {split:5s} {path}")
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    from training.data import DataError, load_jsonl

    status = 0
    for path in args.files:
        try:
            print(f"{path}: {len(load_jsonl(path))} valid records")
        except DataError as exc:
            print(str(exc), file=sys.stderr)
            status = 1
    return status


def _add_train_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of `tenantlora train lora|qlora|full`."""
    p.add_argument(
        "--base",
        default=_default_base(),
        help="embedded name, checkpoint folder or hub id (default: the server's)",
    )
    p.add_argument("--data", required=True, help="training JSONL (messages or prompt/completion)")
    p.add_argument("--eval-data", help="held-out JSONL: eval loss before/after training")
    p.add_argument("--out", required=True, help="output folder (adapter or full checkpoint)")
    p.add_argument(
        "--lr",
        type=float,
        default=None,
        help=f"learning rate (default per method: {DEFAULT_LEARNING_RATE})",
    )
    p.add_argument("--max-steps", type=int, default=100, help="optimizer steps (<=0: epochs)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--max-length", type=int, default=256, help="tokens per example (truncated)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--logging-steps", type=int, default=5)
    p.add_argument(
        "--skip-eval-before", action="store_true", help="skip the held-out loss before training"
    )
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--alpha", type=int, default=16, help="LoRA alpha")
    p.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout")
    p.add_argument("--target-modules", default=",".join(LORA_TARGET_MODULES))
    p.add_argument(
        "--save-dtype",
        default="float32",
        choices=("float32", "bfloat16"),
        help="full: checkpoint dtype (bfloat16 halves it but erases small updates)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    from training import search

    search.add_arguments(p)


def register(subparsers: argparse._SubParsersAction) -> None:
    from training import harness_eval
    from training import results as results_mod
    from training.tasks import TASK_NAMES

    train = subparsers.add_parser(
        "train", help="LoRA / QLoRA / full fine-tuning (TRL SFTTrainer); the results table"
    )
    methods = train.add_subparsers(dest="method", required=True)
    for method in METHODS:
        p = methods.add_parser(method, help=f"{method} fine-tuning")
        _add_train_arguments(p)
        p.set_defaults(func=cmd_train)
    results = methods.add_parser(
        "results",
        help="the method x task results table (data, training, merge, eval, report)",
        description=results_mod.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    results_mod.add_arguments(results)
    results.set_defaults(func=results_mod.run)

    p = subparsers.add_parser("merge", help="merge a LoRA adapter into its base (checked)")
    p.add_argument("adapter", help="PEFT adapter folder")
    p.add_argument("--out", required=True)
    p.add_argument("--base", default=None, help="default: the adapter's base_model_name_or_path")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16"),
        help="float32: exact, checked within 1e-3; bfloat16: half the size, lossy",
    )
    p.add_argument(
        "--format",
        default="hf",
        choices=("hf", "gguf"),
        help="gguf: also write OUT/model-<gguf-dtype>.gguf (llama.cpp, Ollama), checked likewise",
    )
    p.add_argument("--gguf-dtype", default="f16", choices=("f16", "f32"))
    p.set_defaults(func=cmd_merge)

    p = subparsers.add_parser(
        "eval", help="held-out and forgetting scores through vLLM (--harness: lm-eval-harness)"
    )
    p.add_argument("--base", default=_default_base())
    p.add_argument("--data", help="folder from `tenantlora data generate`")
    p.add_argument(
        "--tasks",
        default=None,
        help=f"default: {','.join(TASK_NAMES)}; --harness: those in --data, general, general_mc",
    )
    for flag, what in (
        ("--lora", "LoRA adapter"),
        ("--qlora", "QLoRA adapter"),
        ("--full", "full fine-tune checkpoint"),
        ("--merged", "merged model"),
    ):
        p.add_argument(flag, action="append", metavar="TASK=PATH", help=f"{what} for TASK")
    p.add_argument("--max-lora-rank", type=int, default=16)
    p.add_argument("--memory-share", type=float, default=None)
    p.add_argument("--kv-cache-gib", type=float, default=None, help="default: the server's")
    p.add_argument("--enforce-eager", action="store_true", help="skip vLLM graph compilation")
    p.add_argument("--skip-base", action="store_true", help="do not score the base model itself")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float32", "bfloat16", "float16"),
        help="engine dtype (auto: as the server picks it; float32 keeps small full fine-tune "
        "updates that bfloat16 weights round away)",
    )
    p.add_argument("--out", help="write the full results JSON here (--harness: a folder)")
    harness_eval.add_arguments(p)
    p.set_defaults(func=cmd_eval)

    p = subparsers.add_parser(
        "eval-engine",
        help="(used by `tenantlora eval`) score one engine's runs: SPEC.json -> OUT.json",
    )
    p.add_argument("spec", type=Path)
    p.add_argument("out", type=Path)
    p.set_defaults(func=cmd_eval_engine)

    p = subparsers.add_parser("data", help="task data: generate, check")
    sub = p.add_subparsers(dest="data_command", required=True)
    g = sub.add_parser("generate", help="write <task>/{train,eval}.jsonl for the tenant tasks")
    g.add_argument("--out", required=True)
    g.add_argument("--n-train", type=int, default=600)
    g.add_argument("--n-eval", type=int, default=40)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--tasks", default=",".join(TASK_NAMES))
    g.set_defaults(func=cmd_data_generate)
    c = sub.add_parser("check", help="validate JSONL files, naming file and line of bad records")
    c.add_argument("files", nargs="+")
    c.set_defaults(func=cmd_data_check)

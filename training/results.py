"""The training results table: method x task, from one run on this machine.

    tenantlora train results --work /tmp/tl-matrix                 # everything, resumable
    tenantlora train results --work /tmp/tl-matrix --stage table   # re-render only

Stages: generate data -> train (LoRA and full per task, plus a short QLoRA probe; `--jobs`
trainings at a time, each a `tenantlora train` process) -> merge the LoRA adapters -> evaluate
through vLLM (`training.evaluate`) -> write benchmarks/results/training_results.{json,md,png}.
A finished stage's outputs are reused, so an interrupted run picks up where it stopped.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from tqdm import tqdm

from training.report import TrainingReport
from training.tasks import TASK_NAMES

log = logging.getLogger(__name__)
RESULTS_DIR = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
STEM = "training_results"


def _run(cmd: list[str], log_path: Path, threads: int, nice: int) -> None:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    full = (["nice", "-n", str(nice)] if nice else []) + cmd
    with log_path.open("w") as fh:
        subprocess.run(full, stdout=fh, stderr=subprocess.STDOUT, env=env, check=True)


def _train_cmd(
    args: argparse.Namespace, data: Path, work: Path, method: str, task: str, steps: int
) -> list[str]:
    """The `tenantlora train` command line of one run of the table."""
    cmd = [sys.executable, "-m", "serving.cli", "train", method, "--base", args.base]
    cmd += ["--data", str(data / task / "train.jsonl")]
    cmd += ["--eval-data", str(data / task / "eval.jsonl")]
    cmd += ["--out", str(work / "runs" / f"{method}-{task}"), "--max-steps", str(steps)]
    cmd += ["--batch-size", str(args.batch_size), "--threads", str(args.threads)]
    cmd += ["--logging-steps", "1" if method == "qlora" else "2"]
    if args.skip_eval_before and method != "qlora":
        cmd.append("--skip-eval-before")
    return cmd


def train_jobs(
    args: argparse.Namespace, data: Path, work: Path
) -> list[tuple[str, str, list[str]]]:
    jobs = [
        (method, task, _train_cmd(args, data, work, method, task, args.steps))
        for method in ("lora", "full")
        for task in args.tasks
    ]
    if args.qlora_steps > 0:
        task = args.qlora_task
        jobs.append(("qlora", task, _train_cmd(args, data, work, "qlora", task, args.qlora_steps)))
    # Alternate the two methods so parallel workers finish at about the same time.
    order = args.order.split(",")
    return sorted(jobs, key=lambda j: (order.index(j[1]) if j[1] in order else 9, j[0] == "qlora"))


def stage_train(args: argparse.Namespace, data: Path, work: Path) -> None:
    todo = [
        j
        for j in train_jobs(args, data, work)
        if not (work / "runs" / f"{j[0]}-{j[1]}" / "training_report.json").is_file()
    ]
    (work / "logs").mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(todo), desc="train", unit="run")
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {
            pool.submit(
                _run, cmd, work / "logs" / f"train-{m}-{t}.log", args.threads, args.nice
            ): f"{m}-{t}"
            for m, t, cmd in todo
        }
        for future in as_completed(futures):
            name = futures[future]
            try:
                future.result()
                bar.set_postfix_str(f"done {name}")
            except subprocess.CalledProcessError:
                log.error("training %s failed; see %s", name, work / "logs" / f"train-{name}.log")
            bar.update()
    bar.close()


def stage_merge(args: argparse.Namespace, work: Path) -> None:
    for task in tqdm(args.merged_tasks, desc="merge", unit="adapter"):
        out = work / "runs" / f"merged-{task}"
        adapter = work / "runs" / f"lora-{task}"
        if (out / "merge_report.json").is_file() or not (
            adapter / "training_report.json"
        ).is_file():
            continue
        _run(
            [sys.executable, "-m", "serving.cli", "merge", str(adapter), "--out", str(out)],
            work / "logs" / f"merge-{task}.log",
            args.threads,
            args.nice,
        )


def stage_eval(args: argparse.Namespace, data: Path, work: Path) -> None:
    out = work / "eval.json"
    if out.is_file():
        return
    runs = work / "runs"

    def present(prefix: str, tasks, marker: str) -> list[str]:
        return [
            f"{t}={runs / f'{prefix}-{t}'}"
            for t in tasks
            if (runs / f"{prefix}-{t}" / marker).is_file()
        ]

    cmd = [
        sys.executable,
        "-m",
        "serving.cli",
        "eval",
        "--base",
        args.base,
        "--data",
        str(data),
        "--tasks",
        ",".join(args.tasks),
        "--out",
        str(out),
        "--enforce-eager",
        "--kv-cache-gib",
        str(args.kv_cache_gib),
    ]
    for flag, prefix, tasks, marker in (
        ("--lora", "lora", args.tasks, "training_report.json"),
        ("--qlora", "qlora", [args.qlora_task], "training_report.json"),
        ("--full", "full", args.tasks, "training_report.json"),
        ("--merged", "merged", args.merged_tasks, "merge_report.json"),
    ):
        for pair in present(prefix, tasks, marker):
            cmd += [flag, pair]
    env_threads = max(args.threads, 2)
    _run(cmd, work / "logs" / "eval.log", env_threads, args.nice)


def _training_fields(r: TrainingReport) -> dict:
    """The table's columns that come from a run's training_report.json."""
    return {
        "trainable_share": r.trainable_share,
        "trainable_params": r.trainable_params,
        "steps": r.steps,
        "train_time_s": r.wall_time_s,
        "tokens_per_s": r.tokens_per_s,
        "peak_memory_bytes": r.peak_memory_bytes,
        "artifact_bytes": r.artifact_bytes,
        "train_loss_final": r.train_loss_final,
        "eval_loss_before": r.eval_loss_before,
        "eval_loss_final": r.eval_loss_final,
        "device": r.device,
        "learning_rate": r.config.get("learning_rate"),
    }


def build_rows(work: Path) -> tuple[list[dict], dict]:
    """Rows from every evaluation file in `work` (eval.json, or pieces eval-*.json)."""
    from training.evaluate import Cell, summarize

    cells = []
    for path in sorted(work.glob("eval*.json")):
        cells += json.loads(path.read_text())["cells"]
    summary = summarize([Cell(**c) for c in cells])
    evaluation = {"cells": cells, "summary": summary}
    rows = []
    base = summary.get("base", {})
    for label in ("base", "lora", "qlora", "full", "merged"):
        for task, cell in sorted(summary.get(label, {}).items()):
            row = {
                "method": label,
                "task": task,
                "score": cell.get("score"),
                "n": cell.get("n"),
                "general": cell.get("general"),
                "forgetting": cell.get("forgetting"),
                "base_score": base.get(task, {}).get("score"),
            }
            run = work / "runs" / f"{label}-{task}"
            if label in ("lora", "qlora", "full") and (run / "training_report.json").is_file():
                r = TrainingReport.read(run / "training_report.json")
                row.update(_training_fields(r))
            if label == "merged" and (run / "merge_report.json").is_file():
                m = json.loads((run / "merge_report.json").read_text())
                row.update(
                    artifact_bytes=m["artifact_bytes"],
                    merge_max_logit_diff=m["max_abs_logit_diff"],
                    merge_top1_agreement=m["top1_agreement"],
                )
            rows.append(row)
    # Trained but not evaluated (the session ran out of CPU time): still show the training cost.
    seen = {(r["method"], r["task"]) for r in rows}
    for report_path in sorted((work / "runs").glob("*/training_report.json")):
        label, _, task = report_path.parent.name.partition("-")
        if (label, task) in seen:
            continue
        r = TrainingReport.read(report_path)
        rows.append({
            "method": label, "task": task, "score": None, "n": 0, "general": None,
            "forgetting": None, "base_score": base.get(task, {}).get("score"),
            **_training_fields(r), "note": "not evaluated",
        })  # fmt: skip
    order = {m: i for i, m in enumerate(("base", "lora", "qlora", "merged", "full"))}
    rows.sort(key=lambda r: (r["task"], order.get(r["method"], 9)))
    return rows, evaluation


def _fmt(value, kind: str) -> str:
    if value is None:
        return "–"
    if kind == "pct":
        return f"{100 * value:.1f}"
    if kind == "share":
        return f"{100 * value:.2f}%"
    if kind == "s":
        return f"{value / 60:.1f} min" if value >= 120 else f"{value:.0f} s"
    if kind == "bytes":
        return f"{value / 2**30:.2f} GiB" if value >= 2**30 else f"{value / 2**20:.1f} MiB"
    if kind == "loss":
        return f"{value:.3f}"
    return str(value)


def write_markdown(rows: list[dict], meta: dict, path: Path) -> None:
    lines = [
        "# Training results: LoRA vs QLoRA vs full fine-tuning (SmolLM2-135M-Instruct)",
        "",
        f"One run on {meta['device']}, {meta['date']}. **No GPU was lent in this session**: "
        "every figure is from the CPU, shared with other jobs (so times are pessimistic).",
        f"Training: {meta['steps']} steps x batch {meta['batch_size']} per task and method, "
        "default learning rates (LoRA 2e-4, r=8, alpha=16, all attention+MLP projections; full "
        "1e-5), fp32, seed 0. Scores: held-out split "
        f"({meta['n_eval']} examples per task), greedy, generated by vLLM "
        f"{meta['vllm']} (LoRA adapters through `LoRARequest` on the base engine; full and "
        "merged models each in their own engine). Forgetting = base score minus the model's "
        f"score on the fixed general set ({meta['n_general']} questions the base passes), in "
        "points. Peak memory is the training process's max RSS.",
        "",
        "| task | method | score | base | forgetting | trainable | steps | train time | "
        "tokens/s | peak memory | artifact | held-out loss after |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["method"] == "base":
            continue
        loss = _fmt(r.get("eval_loss_final"), "loss")
        lines.append(
            f"| {r['task']} | {r['method']} | {r.get('note') or _fmt(r['score'], 'pct')} | "
            f"{_fmt(r['base_score'], 'pct')} | {_fmt(r.get('forgetting'), 'pct')} | "
            f"{_fmt(r.get('trainable_share'), 'share')} | {r.get('steps', '–')} | "
            f"{_fmt(r.get('train_time_s'), 's')} | "
            f"{_fmt(round(r['tokens_per_s']) if r.get('tokens_per_s') else None, '')} | "
            f"{_fmt(r.get('peak_memory_bytes'), 'bytes')} | {_fmt(r.get('artifact_bytes'), 'bytes')} | "
            f"{loss} |"
        )
    base = [r for r in rows if r["method"] == "base"]
    lines += [
        "",
        "Base model (no fine-tuning): "
        + ", ".join(f"{r['task']} {_fmt(r['score'], 'pct')}" for r in base)
        + f"; general set {_fmt(base[0]['general'], 'pct') if base else '–'}.",
        "",
    ]
    for note in meta.get("notes", []):
        lines += ["", note]
    path.write_text("\n".join(lines) + "\n")


def write_plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in rows if r["method"] != "base" or r["task"] != "-"})
    methods = [
        m
        for m in ("base", "lora", "qlora", "merged", "full")
        if any(r["method"] == m for r in rows)
    ]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    scored = any(r.get("score") is not None and r["method"] != "base" for r in rows)
    key = "score" if scored else "eval_loss_final"
    methods = [m for m in methods if any(r.get(key) is not None and r["method"] == m for r in rows)]
    width = 0.8 / max(len(methods), 1)
    for i, method in enumerate(methods):
        values = []
        for task in tasks:
            cell = next((r for r in rows if r["method"] == method and r["task"] == task), None)
            value = cell.get(key) if cell else None
            values.append(0 if value is None else (100 * value if scored else value))
        axes[0].bar([t + i * width for t in range(len(tasks))], values, width, label=method)
    axes[0].set_xticks([t + 0.4 - width / 2 for t in range(len(tasks))], tasks)
    if scored:
        axes[0].set_ylabel("held-out score (%)")
        axes[0].set_ylim(0, 105)
        axes[0].set_title("Held-out score per task")
    else:
        axes[0].set_ylabel("held-out loss (lower is better)")
        axes[0].set_title("Held-out loss after training (generation scores not evaluated)")
    axes[0].legend(fontsize=8)
    for method, marker in (("lora", "o"), ("qlora", "^"), ("full", "s")):
        pts = [r for r in rows if r["method"] == method and r.get("train_time_s")]
        axes[1].scatter(
            [r["train_time_s"] / 60 for r in pts],
            [r["peak_memory_bytes"] / 2**30 for r in pts],
            marker=marker,
            label=method,
        )
        for r in pts:
            axes[1].annotate(
                r["task"], (r["train_time_s"] / 60, r["peak_memory_bytes"] / 2**30), fontsize=7
            )
    axes[1].set_xlabel("train time (min)")
    axes[1].set_ylabel("peak RSS (GiB)")
    axes[1].set_title("Training cost (CPU, shared)")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def stage_table(args: argparse.Namespace, work: Path, out_dir: Path) -> None:
    import vllm

    from training.tasks import GENERAL_QUESTIONS

    rows, evaluation = build_rows(work)
    devices = {r["device"] for r in rows if r.get("device")}
    meta = {
        "device": ", ".join(sorted(devices)) or "cpu",
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "n_eval": args.n_eval,
        "n_general": len(GENERAL_QUESTIONS),
        "vllm": vllm.__version__,
        "gpu": "none lent in this session",
        "notes": args.notes or [],
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{STEM}.json").write_text(
        json.dumps({"meta": meta, "rows": rows, "cells": evaluation["cells"]}, indent=2) + "\n"
    )
    write_markdown(rows, meta, out_dir / f"{STEM}.md")
    write_plot(rows, out_dir / f"{STEM}.png")
    print((out_dir / f"{STEM}.md").read_text())


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of `tenantlora train results`."""
    p.add_argument("--work", type=Path, required=True, help="scratch folder (data, runs, logs)")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--base", default="smollm2-135m-instruct")
    p.add_argument("--tasks", default=",".join(TASK_NAMES))
    p.add_argument("--merged-tasks", default="intent,format")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--n-train", type=int, default=600)
    p.add_argument("--n-eval", type=int, default=24)
    p.add_argument("--qlora-task", default="intent")
    p.add_argument("--qlora-steps", type=int, default=2, help="QLoRA probe steps (0: skip)")
    p.add_argument("--skip-eval-before", action="store_true")
    p.add_argument(
        "--order", default="intent,format,catalog,extract", help="tasks trained first come first"
    )
    p.add_argument("--jobs", type=int, default=2, help="trainings at a time")
    p.add_argument("--threads", type=int, default=1, help="torch threads per training")
    p.add_argument("--nice", type=int, default=5)
    p.add_argument("--kv-cache-gib", type=float, default=1.0)
    p.add_argument("--stage", choices=("all", "train", "merge", "eval", "table"), default="all")
    p.add_argument("--note", dest="notes", action="append", help="line added under the table")


def run(args: argparse.Namespace) -> int:
    """Run the table's stages (all, or the one `--stage` names)."""
    args.tasks = args.tasks.split(",")
    args.merged_tasks = [t for t in args.merged_tasks.split(",") if t]

    work: Path = args.work
    if args.stage in ("all", "train", "eval"):
        # Resolve (and if needed prepare) the base once, not in each parallel training process.
        from serving.base_model import resolve_base_model
        from serving.settings import Settings

        args.base = str(resolve_base_model(args.base, Settings().models_dir))
    data = work / "data"
    if not (data / "general" / "eval.jsonl").is_file():
        from training.tasks import generate_all

        generate_all(data, n_train=args.n_train, n_eval=args.n_eval, tasks=tuple(args.tasks))
    stages = ("train", "merge", "eval", "table") if args.stage == "all" else (args.stage,)
    started = time.perf_counter()
    for stage in stages:
        log.info("stage %s (%.0f s so far)", stage, time.perf_counter() - started)
        if stage == "train":
            stage_train(args, data, work)
        elif stage == "merge":
            stage_merge(args, work)
        elif stage == "eval":
            stage_eval(args, data, work)
        else:
            stage_table(args, work, args.out_dir)
    log.info("finished in %.0f s", time.perf_counter() - started)
    return 0

"""The training results table: method x task, from one run on this machine.

    tenantlora train results --work /tmp/tl-matrix                 # everything, resumable
    tenantlora train results --work /tmp/tl-matrix --stage table   # re-render only

Stages: generate data (plus a validation split for the searched tasks) -> train (LoRA and full
per task: a recipe search, `train METHOD --search`, on the `--search-tasks`, choosing on the
validation split; fixed `--recipe`s elsewhere, e.g. the knowledge task trained longer; an
optional QLoRA probe; `--jobs` trainings at a time, each a `tenantlora train` process) -> merge the
LoRA adapters -> evaluate through vLLM (`training.evaluate`, float32 by default) -> lm-eval-harness
multiple-choice forgetting set through each model's OpenAI endpoint -> write
benchmarks/results/training_results.{json,md,png} with the goals under `analysis.goals`.
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

log = logging.getLogger(__name__)
RESULTS_DIR = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
STEM = "training_results"


def _run(cmd: list[str], log_path: Path, threads: int, nice: int) -> None:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    full = (["nice", "-n", str(nice)] if nice else []) + cmd
    with log_path.open("w") as fh:
        subprocess.run(full, stdout=fh, stderr=subprocess.STDOUT, env=env, check=True)


def parse_recipes(values: list[str] | None) -> dict[str, dict[str, str]]:
    """`--recipe lora-catalog=lr:1e-3,steps:128` -> {"lora-catalog": {"lr": "1e-3", ...}}."""
    out: dict[str, dict[str, str]] = {}
    for value in values or []:
        run, _, spec = value.partition("=")
        fields = dict(item.split(":", 1) for item in spec.split(",") if ":" in item)
        unknown = set(fields) - {"lr", "steps", "rank"}
        if not run or not fields or unknown or not _numbers(fields):
            raise SystemExit(f"--recipe {value!r}: expected METHOD-TASK=lr:X,steps:N,rank:R")
        out[run] = fields
    return out


def _numbers(fields: dict[str, str]) -> bool:
    """lr a positive float, steps and rank positive integers."""
    try:
        return all((float(v) if k == "lr" else int(v)) > 0 for k, v in fields.items())
    except ValueError:
        return False


def _searched(args: argparse.Namespace, method: str, task: str) -> bool:
    return method in ("lora", "full") and task in args.search_tasks


def _train_cmd(
    args: argparse.Namespace, data: Path, work: Path, method: str, task: str, steps: int
) -> list[str]:
    """The `tenantlora train` command line of one run of the table: a recipe search (scored on
    the validation split, never on the held-out set the table reports) or a fixed recipe."""
    recipe = args.recipes.get(f"{method}-{task}", {})
    steps = int(recipe.get("steps", steps))
    cmd = [sys.executable, "-m", "serving.cli", "train", method, "--base", args.base]
    cmd += ["--data", str(data / task / "train.jsonl")]
    cmd += ["--out", str(work / "runs" / f"{method}-{task}"), "--max-steps", str(steps)]
    cmd += ["--batch-size", str(args.batch_size), "--threads", str(args.threads)]
    cmd += ["--logging-steps", "1" if method == "qlora" else "2"]
    if "lr" in recipe:
        cmd += ["--lr", recipe["lr"]]
    if "rank" in recipe:
        cmd += ["--rank", recipe["rank"], "--alpha", str(2 * int(recipe["rank"]))]
    if _searched(args, method, task):
        cmd += ["--eval-data", str(data / task / "valid.jsonl"), "--search"]
        cmd += ["--search-lr", args.lora_lrs if method == "lora" else args.full_lrs]
        cmd += ["--search-rounds", str(args.search_rounds)]
        cmd += ["--max-forgetting", str(args.max_forgetting)]
        cmd += ["--search-dtype", args.dtype, "--search-enforce-eager"]
        cmd += ["--search-kv-cache-gib", str(args.kv_cache_gib)]
        if method == "lora":
            cmd += ["--search-rank", args.search_ranks]
        return cmd
    cmd += ["--eval-data", str(data / task / "eval.jsonl")]
    if args.skip_eval_before and method != "qlora":
        cmd.append("--skip-eval-before")
    return cmd


def write_validation_split(data: Path, tasks: list[str], n: int) -> None:
    """`<task>/valid.jsonl`: held-out-style examples (seed 1) that repeat no prompt of the
    training or held-out files, for the recipe search to choose on. The catalog task has one
    fixed pool of held-out facts, so it gets no separate split (and is not searched)."""
    from training.data import load_jsonl
    from training.tasks import generate, write_jsonl

    for task in tasks:
        path = data / task / "valid.jsonl"
        if task == "catalog" or path.is_file():
            continue
        taken = {
            e.prompt[-1]["content"]
            for split in ("train", "eval")
            for e in load_jsonl(data / task / f"{split}.jsonl")
        }
        records = [
            r
            for r in generate(task, "eval", 3 * n, seed=1)
            if r["messages"][0]["content"] not in taken
        ]
        write_jsonl(path, records[:n])


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

    def position(job: tuple[str, str, list[str]]) -> tuple[int, bool]:
        """Runs named in --order (METHOD-TASK or TASK) first, in that order: longest first
        keeps the parallel workers busy to the end."""
        method, task, _ = job
        for name in (f"{method}-{task}", task):
            if name in order:
                return order.index(name), method == "qlora"
        return len(order), method == "qlora"

    return sorted(jobs, key=position)


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
        "--dtype",
        args.dtype,
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


def harness_targets(
    args: argparse.Namespace, work: Path
) -> list[tuple[str, dict[str, str], list[tuple[str, str | None]]]]:
    """Servers to start for the harness columns: (served base, static adapters, [(row key,
    model name)]). One server holds the base and every LoRA adapter; each full fine-tune is its
    own base. Merged models equal their adapters (checked by `merge`), so they are not rerun."""
    runs = work / "runs"
    loras = {
        f"lora-{t}": str(runs / f"lora-{t}")
        for t in args.tasks
        if (runs / f"lora-{t}" / "training_report.json").is_file()
    }
    targets = [(args.base, loras, [("base", None)] + [(k, k) for k in loras])]
    for t in args.tasks:
        full = runs / f"full-{t}"
        if (full / "training_report.json").is_file():
            targets.append((str(full), {}, [(f"full-{t}", None)]))
    return targets


def stage_harness(args: argparse.Namespace, work: Path) -> None:
    """lm-eval-harness's multiple-choice general-knowledge set (loglikelihood) through each
    model's OpenAI endpoint: the second forgetting check beside the project's general set."""
    import contextlib

    from training.harness_eval import MC_TASK, HarnessPlan, started_server, write_report
    from training.harness_eval import run as harness_run

    settings = {"TENANTLORA_DTYPE": args.dtype}  # the servers score as the vLLM eval does
    todo = [
        (
            base,
            loras,
            [(k, m) for k, m in models if not (work / "harness" / k / "harness.json").is_file()],
        )
        for base, loras, models in harness_targets(args, work)
    ]
    todo = [t for t in todo if t[2]]
    bar = tqdm(total=sum(len(m) for _, _, m in todo), desc="harness", unit="model")
    for base, loras, models in todo:
        log_path = work / "logs" / f"harness-{Path(base).name}.log"
        with contextlib.ExitStack() as stack:
            server = stack.enter_context(started_server(base, loras, log_path, settings))
            for key, model in models:
                plan = HarnessPlan(
                    server=server,
                    model=model,
                    tokenizer=Path(args.base),
                    out=work / "harness" / key,
                    tasks=[MC_TASK],
                    limit=args.harness_limit,
                )
                write_report(harness_run(plan), plan.out)
                bar.update()
    bar.close()
    _record_end_load(work)


def _record_end_load(work: Path) -> None:
    """The load average as the run's last measuring stage ends (a re-rendered table keeps it)."""
    _save_run_meta(work, {**_run_meta(work), "load_after": round(os.getloadavg()[0], 2)})


def _harness_acc(work: Path, key: str) -> float | None:
    path = work / "harness" / key / "harness.json"
    if not path.is_file():
        return None
    rows = json.loads(path.read_text())["rows"]
    return next((r["value"] for r in rows if r["metric"] == "acc"), None)


def _search_fields(run: Path) -> dict:
    path = run / "search_report.json"
    if not path.is_file():
        return {}
    report = json.loads(path.read_text())
    return {
        "search": {
            "chosen": report["chosen"],
            "within_budget": report["within_budget"],
            "max_forgetting": report["max_forgetting"],
            "note": report["note"],
            "wall_time_s": report["wall_time_s"],
            "base_scores": report["base_scores"],
            "candidates": [
                {
                    k: c.get(k)
                    for k in (
                        "name",
                        "status",
                        "steps",
                        "task_score",
                        "general_score",
                        "forgetting",
                        "eval_loss",
                        "train_time_s",
                    )
                }
                for c in report["candidates"]
            ],
        }
    }


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
        "rank": r.config.get("lora_r") if r.method != "full" else None,
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
    base_mc = _harness_acc(work, "base")
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
                row.update(_training_fields(r), **_search_fields(run))
            key = "base" if label == "base" else f"{label}-{task}"
            row["mc_acc"] = _harness_acc(work, key)
            if label != "base" and row["mc_acc"] is not None and base_mc is not None:
                row["mc_forgetting"] = base_mc - row["mc_acc"]
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


def _machine(meta: dict) -> str:
    """The CPU's description, and the training device where it is not that CPU (a GPU)."""
    if meta["device"].startswith("cpu"):
        return f"the CPU ({meta['cpu']})"
    return f"{meta['device']} (host CPU: {meta['cpu']})"


def _points(value: float | None) -> str:
    return "–" if value is None else f"{value:+.1f}"


def _recipe(r: dict) -> str:
    if r.get("learning_rate") is None:
        return "–"
    rank = f", r={r['rank']}" if r.get("rank") else ""
    return f"lr {r['learning_rate']:g}{rank}, {r.get('steps', '?')} steps"


def _row(rows: list[dict], method: str, task: str) -> dict | None:
    return next((r for r in rows if r["method"] == method and r["task"] == task), None)


def analyse(rows: list[dict], goal_tasks: list[str], knowledge_task: str) -> dict:
    """The headline figures as `analysis.goals` (value, goal, met), as the serving benchmark
    writes them: LoRA within 3 points of full on the goal tasks at < 2 % trainable, forgetting no
    worse than full's on both general sets, and the knowledge task's gap."""
    goals: dict[str, dict] = {}
    for task in goal_tasks:
        lora, full = _row(rows, "lora", task), _row(rows, "full", task)
        if not lora or not full or lora.get("score") is None or full.get("score") is None:
            continue
        gap = 100 * (lora["score"] - full["score"])
        goals[f"lora_vs_full_score_{task}"] = {
            "value": gap, "goal": ">= -3 points", "met": gap >= -3 - 1e-9,
            "figures": {"lora": lora["score"], "full": full["score"]},
        }  # fmt: skip
        if lora.get("trainable_share") is not None:
            goals[f"lora_trainable_share_{task}"] = {
                "value": lora["trainable_share"], "goal": "< 0.02",
                "met": lora["trainable_share"] < 0.02,
            }  # fmt: skip
        for key, name in (("forgetting", "general"), ("mc_forgetting", "harness_mc")):
            if lora.get(key) is None or full.get(key) is None:
                continue
            diff = 100 * (lora[key] - full[key])
            goals[f"lora_vs_full_forgetting_{name}_{task}"] = {
                "value": diff, "goal": "<= 0 points (LoRA forgets no more than full)",
                "met": diff <= 1e-9,
                "figures": {"lora": 100 * lora[key], "full": 100 * full[key]},
            }  # fmt: skip
    lora, full = _row(rows, "lora", knowledge_task), _row(rows, "full", knowledge_task)
    if lora and full and lora.get("score") is not None and full.get("score") is not None:
        best = 100 * max(lora["score"], full["score"])
        goals[f"knowledge_best_score_{knowledge_task}"] = {
            "value": best, "goal": ">= 50 (%) for at least one method", "met": best >= 50,
        }  # fmt: skip
        goals[f"knowledge_lora_vs_full_{knowledge_task}"] = {
            "value": 100 * (lora["score"] - full["score"]), "goal": "reported (points)",
            "met": None, "figures": {"lora": lora["score"], "full": full["score"]},
        }  # fmt: skip
    return {"goals": goals}


def write_markdown(rows: list[dict], meta: dict, analysis: dict, path: Path) -> None:
    lines = [
        "# Training results: LoRA vs QLoRA vs full fine-tuning (SmolLM2-135M-Instruct)",
        "",
        f"One run on {_machine(meta)}, {meta['date']}, nothing else on the machine "
        f"(load average {meta['load_before']} before, {meta['load_after']} after). GPU: "
        f"{meta['gpu']}.",
        f"Training: batch {meta['batch_size']}, fp32, seed 0, {meta['jobs']} training(s) at a "
        f"time with {meta['threads']} thread(s) each. Recipes: "
        f"searched on {', '.join(meta['search_tasks']) or 'no task'} (LoRA learning rates "
        f"{meta['lora_lrs']}, rank {meta['search_ranks']}; full {meta['full_lrs']}; "
        f"{meta['steps']} steps; forgetting budget {meta['max_forgetting']:g} points), each "
        "candidate scored on a validation split that shares no prompt with the held-out set "
        "below; other rows use the recipe shown. Scores: held-out split "
        f"({meta['n_eval']} examples per task), greedy, vLLM {meta['vllm']} in {meta['dtype']} "
        "(LoRA adapters through `LoRARequest` on the base engine; full and merged models each in "
        "their own engine). Forgetting = base score minus the model's score on the project's "
        f"general set ({meta['n_general']} questions the base passes), in points; MC = "
        "lm-eval-harness multiple-choice general-knowledge set (loglikelihood, "
        f"{meta['n_mc']} questions) through the server's OpenAI endpoint, MC forgetting likewise. "
        "Peak memory is the training process's max RSS.",
        "",
        "| task | method | recipe | score | base | forgetting | MC acc | MC forgetting | "
        "trainable | train time | tokens/s | peak memory | artifact | held-out loss |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["method"] == "base":
            continue
        lines.append(
            f"| {r['task']} | {r['method']} | {_recipe(r)} | "
            f"{r.get('note') or _fmt(r['score'], 'pct')} | {_fmt(r['base_score'], 'pct')} | "
            f"{_fmt(r.get('forgetting'), 'pct')} | {_fmt(r.get('mc_acc'), 'pct')} | "
            f"{_fmt(r.get('mc_forgetting'), 'pct')} | {_fmt(r.get('trainable_share'), 'share')} | "
            f"{_fmt(r.get('train_time_s'), 's')} | "
            f"{_fmt(round(r['tokens_per_s']) if r.get('tokens_per_s') else None, '')} | "
            f"{_fmt(r.get('peak_memory_bytes'), 'bytes')} | "
            f"{_fmt(r.get('artifact_bytes'), 'bytes')} | {_fmt(r.get('eval_loss_final'), 'loss')} |"
        )
    base = [r for r in rows if r["method"] == "base"]
    general = next((r["general"] for r in base if r.get("general") is not None), None)
    mc = next((r["mc_acc"] for r in base if r.get("mc_acc") is not None), None)
    lines += [
        "",
        "Base model (no fine-tuning): "
        + ", ".join(f"{r['task']} {_fmt(r['score'], 'pct')}" for r in base if r["task"] != "-")
        + f"; general set {_fmt(general, 'pct')}; MC set {_fmt(mc, 'pct')}.",
        "",
    ]
    searched = [r for r in rows if r.get("search")]
    if searched:
        lines += ["## Recipe search", ""]
        lines += [
            "Every candidate of `tenantlora train METHOD --search` (validation split; the pick "
            "rule: best validation score within the forgetting budget, else least forgetting).",
            "",
            "| task | method | candidate | status | val score | general | forgetting | "
            "val loss | train time |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in searched:
            for c in r["search"]["candidates"]:
                lines.append(
                    f"| {r['task']} | {r['method']} | {c['name']} | {c['status']} | "
                    f"{_fmt(c['task_score'], 'pct')} | {_fmt(c['general_score'], 'pct')} | "
                    f"{_points(c['forgetting'])} | "
                    f"{_fmt(c['eval_loss'], 'loss')} | {_fmt(c['train_time_s'], 's')} |"
                )
        lines.append("")
    goals = analysis.get("goals", {})
    if goals:
        lines += ["## Goals", "", "| goal | value | target | met |", "|---|---|---|---|"]
        for name, g in goals.items():
            value = g["value"]
            shown = f"{value:.4f}" if abs(value) < 1 and "share" in name else f"{value:.1f}"
            met = "–" if g["met"] is None else ("yes" if g["met"] else "**no**")
            lines.append(f"| {name} | {shown} | {g['goal']} | {met} |")
        lines.append("")
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
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.4))
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
    trained = [r for r in rows if r["method"] != "base" and r.get("forgetting") is not None]
    labels = [f"{r['method']}\n{r['task']}" for r in trained]
    xs = range(len(trained))
    axes[1].bar([x - 0.2 for x in xs], [100 * r["forgetting"] for r in trained], 0.4,
                label="project general set")  # fmt: skip
    axes[1].bar([x + 0.2 for x in xs], [100 * (r.get("mc_forgetting") or 0) for r in trained],
                0.4, label="lm-eval MC set")  # fmt: skip
    axes[1].axhline(0, color="black", linewidth=0.6)
    axes[1].set_xticks(list(xs), labels, fontsize=7)
    axes[1].set_ylabel("forgetting (points below base)")
    axes[1].set_title("Forgetting (lower is better)")
    axes[1].legend(fontsize=8)
    for method, marker in (("lora", "o"), ("qlora", "^"), ("full", "s")):
        pts = [r for r in rows if r["method"] == method and r.get("train_time_s")]
        axes[2].scatter(
            [r["train_time_s"] / 60 for r in pts],
            [r["peak_memory_bytes"] / 2**30 for r in pts],
            marker=marker,
            label=method,
        )
        for r in pts:
            axes[2].annotate(
                r["task"], (r["train_time_s"] / 60, r["peak_memory_bytes"] / 2**30), fontsize=7
            )
    axes[2].set_xlabel("train time of the chosen recipe (min)")
    axes[2].set_ylabel("peak RSS (GiB)")
    axes[2].set_title("Training cost (CPU)")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _run_meta(work: Path) -> dict:
    """Facts recorded when the run started (its load average), kept across resumed stages."""
    path = work / "run_meta.json"
    if not path.is_file():
        _save_run_meta(work, {"load_before": round(os.getloadavg()[0], 2)})
    return json.loads(path.read_text())


def _save_run_meta(work: Path, meta: dict) -> None:
    work.mkdir(parents=True, exist_ok=True)
    (work / "run_meta.json").write_text(json.dumps(meta) + "\n")


def stage_table(args: argparse.Namespace, work: Path, out_dir: Path) -> None:
    import vllm

    from serving.hardware import cpu_description
    from training.harness_eval import MC_DATA
    from training.tasks import GENERAL_QUESTIONS

    rows, evaluation = build_rows(work)
    devices = {r["device"] for r in rows if r.get("device")}
    meta = {
        "device": ", ".join(sorted(devices)) or "cpu",
        "cpu": cpu_description(),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "load_before": _run_meta(work)["load_before"],
        "load_after": _run_meta(work).get("load_after", round(os.getloadavg()[0], 2)),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "jobs": args.jobs,
        "threads": args.threads,
        "search_tasks": args.search_tasks,
        "lora_lrs": args.lora_lrs,
        "full_lrs": args.full_lrs,
        "search_ranks": args.search_ranks,
        "max_forgetting": args.max_forgetting,
        "recipes": args.recipes,
        "dtype": args.dtype,
        "n_eval": args.n_eval,
        "n_general": len(GENERAL_QUESTIONS),
        "n_mc": args.harness_limit or sum(1 for _ in MC_DATA.open()),
        "vllm": vllm.__version__,
        "gpu": args.gpu_note,
        "notes": args.notes or [],
    }
    analysis = analyse(rows, args.goal_tasks, args.knowledge_task)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{STEM}.json").write_text(
        json.dumps(
            {"meta": meta, "analysis": analysis, "rows": rows, "cells": evaluation["cells"]},
            indent=2,
        )
        + "\n"
    )
    write_markdown(rows, meta, analysis, out_dir / f"{STEM}.md")
    write_plot(rows, out_dir / f"{STEM}.png")
    print((out_dir / f"{STEM}.md").read_text())


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of `tenantlora train results`."""
    p.add_argument("--work", type=Path, required=True, help="scratch folder (data, runs, logs)")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--base", default="smollm2-135m-instruct")
    p.add_argument("--tasks", default="intent,format,catalog")
    p.add_argument("--merged-tasks", default="intent,format")
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--n-train", type=int, default=600)
    p.add_argument("--n-eval", type=int, default=50)
    p.add_argument(
        "--search-tasks", default="intent,format", help="tasks whose recipes are searched"
    )
    p.add_argument("--lora-lrs", default="3e-4,1e-3", help="LoRA learning rates searched")
    p.add_argument("--full-lrs", default="1e-5,3e-5", help="full fine-tune learning rates searched")
    p.add_argument("--search-ranks", default="8", help="LoRA ranks searched")
    p.add_argument("--search-rounds", type=int, default=1, help="1: plain grid")
    p.add_argument("--max-forgetting", type=float, default=12.0, help="search budget, points")
    p.add_argument(
        "--recipe",
        dest="recipe_specs",
        action="append",
        metavar="METHOD-TASK=lr:X,steps:N,rank:R",
        help="fixed recipe of an unsearched run (e.g. the knowledge task trained longer)",
    )
    p.add_argument("--goal-tasks", default="intent,format")
    p.add_argument("--knowledge-task", default="catalog")
    p.add_argument("--dtype", default="float32", help="scoring engines' and servers' dtype")
    p.add_argument("--harness-limit", type=int, default=None, help="MC questions per model")
    p.add_argument("--qlora-task", default="intent")
    p.add_argument("--qlora-steps", type=int, default=0, help="QLoRA probe steps (0: skip)")
    p.add_argument("--skip-eval-before", action="store_true")
    p.add_argument(
        "--order", default="format,intent,catalog", help="tasks trained first come first"
    )
    p.add_argument("--jobs", type=int, default=2, help="trainings at a time")
    p.add_argument("--threads", type=int, default=1, help="torch threads per training")
    p.add_argument("--nice", type=int, default=0)
    p.add_argument("--kv-cache-gib", type=float, default=1.0)
    p.add_argument(
        "--stage",
        choices=("all", "train", "merge", "eval", "harness", "table"),
        default="all",
    )
    p.add_argument("--gpu-note", default="none lent in this session")
    p.add_argument("--note", dest="notes", action="append", help="line added under the table")


def run(args: argparse.Namespace) -> int:
    """Run the table's stages (all, or the one `--stage` names)."""
    args.tasks = args.tasks.split(",")
    args.merged_tasks = [t for t in args.merged_tasks.split(",") if t]
    args.search_tasks = [t for t in args.search_tasks.split(",") if t]
    args.goal_tasks = [t for t in args.goal_tasks.split(",") if t]
    args.recipes = parse_recipes(args.recipe_specs)

    work: Path = args.work
    _run_meta(work)
    if args.stage in ("all", "train", "eval", "harness"):
        # Resolve (and if needed prepare) the base once, not in each parallel training process.
        from serving.base_model import resolve_base_model
        from serving.settings import Settings

        args.base = str(resolve_base_model(args.base, Settings().models_dir))
    data = work / "data"
    if not (data / "general" / "eval.jsonl").is_file():
        from training.tasks import generate_all

        generate_all(data, n_train=args.n_train, n_eval=args.n_eval, tasks=tuple(args.tasks))
    write_validation_split(data, args.search_tasks, args.n_eval)
    stages = (
        ("train", "merge", "eval", "harness", "table") if args.stage == "all" else (args.stage,)
    )
    started = time.perf_counter()
    for stage in stages:
        log.info("stage %s (%.0f s so far)", stage, time.perf_counter() - started)
        if stage == "train":
            stage_train(args, data, work)
        elif stage == "merge":
            stage_merge(args, work)
        elif stage == "eval":
            stage_eval(args, data, work)
        elif stage == "harness":
            stage_harness(args, work)
        else:
            stage_table(args, work, args.out_dir)
    log.info("finished in %.0f s", time.perf_counter() - started)
    return 0

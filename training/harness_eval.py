"""`tenantlora eval --harness`: lm-eval-harness against a served model, over HTTP.

lm-eval (`lm-eval[api]`, its `local-completions` model) reaches the model only through the
server's OpenAI endpoint `/v1/completions`, as any client does, with the tenant's API key; the
model is an adapter name or the base. Every task reads local JSONL (no download at run time):

- `tl_<task>` (generation): a project held-out set (`tenantlora data generate`), its prompts
  rendered with the model's chat template as `tenantlora eval` renders them, greedy, with the
  task's token budget; `score` is the project's own rule (training/tasks.py), beside exact match.
- `tl_general` (generation): the project's general-knowledge forgetting set, scored the same way.
- `tl_general_mc` (multiple choice, loglikelihood): 50 general-knowledge questions with four
  choices (training/harness_tasks/general_mc.jsonl), a standard forgetting check.

The task folder written for a run is self-contained: the JSON report carries the equivalent
`lm_eval` command line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from string import Template

import httpx

from training.data import load_jsonl
from training.tasks import TASK_NAMES, general_records, get_task, write_jsonl

TEMPLATES = Path(__file__).with_name("harness_tasks")
MC_DATA = TEMPLATES / "general_mc.jsonl"
MC_TASK = "general_mc"
PREFIX = "tl_"  # harness task names: tl_<project task>
STARTUP_TIMEOUT = 900.0


class HarnessError(RuntimeError):
    """A run that cannot go ahead (server unreachable, model not visible, missing data)."""


@dataclass
class HarnessPlan:
    server: str  # e.g. http://127.0.0.1:8000
    model: str | None  # adapter name or the base; None: the server's base model
    tokenizer: Path  # the base model's folder (context lengths for loglikelihood)
    out: Path
    tasks: list[str]  # project task names, "general", "general_mc"
    data_dir: Path | None = None  # from `tenantlora data generate` (held-out tasks)
    limit: int | None = None  # items per task
    api_key: str | None = None
    concurrency: int = 8
    timeout: int = 600


@dataclass
class Row:
    task: str
    metric: str
    value: float
    stderr: float | None
    n: int


@dataclass
class HarnessResult:
    server: str
    model: str
    rows: list[Row]
    samples: dict[str, list[dict]] = field(default_factory=dict)
    command: str = ""
    lm_eval_version: str = ""
    limit: int | None = None
    elapsed_s: float = 0.0


# ---- scoring (referenced from the generation task YAMLs with `!function`) --------------------


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """The project's rule for the doc's task (`score`) and exact match of the stripped text."""
    text = results[0]
    return {
        "score": get_task(doc["task"]).score(text, doc["reference"]),
        "exact_match": float(text.strip() == doc["reference"].strip()),
    }


def process_results_general(doc: dict, results: list[str]) -> dict[str, float]:
    """The general set's references are accepted words, so exact match means nothing there."""
    return {"score": get_task("general").score(results[0], doc["reference"])}


# ---- the run's task folder -------------------------------------------------------------------


def default_tasks(data_dir: Path | None) -> list[str]:
    """Every held-out set `data_dir` holds, the general set and the multiple-choice set."""
    held_out = [t for t in TASK_NAMES if data_dir and (data_dir / t / "eval.jsonl").is_file()]
    return [*held_out, "general", MC_TASK]


def _template(name: str) -> Template:
    """A task template from training/harness_tasks, without its comment header."""
    lines = (TEMPLATES / name).read_text().splitlines(keepends=True)
    return Template("".join(line for line in lines if not line.startswith("#")))


def _metrics_yaml(names: list[str]) -> str:
    return "\n".join(
        f"  - metric: {m}\n    aggregation: mean\n    higher_is_better: true" for m in names
    )


def generation_metrics(task: str) -> list[str]:
    return ["score"] if task == "general" else ["score", "exact_match"]


def write_task_folder(plan: HarnessPlan, tokenizer) -> Path:
    """Write one YAML (and its rendered JSONL) per task under `plan.out/tasks`."""
    folder = plan.out / "tasks"
    folder.mkdir(parents=True, exist_ok=True)
    for task in plan.tasks:
        name = PREFIX + task
        if task == MC_TASK:
            text = _template("multiple_choice.yaml.tmpl").substitute(
                task=name, data_file=json.dumps(str(MC_DATA.resolve()))
            )
            (folder / f"{name}.yaml").write_text(text)
            continue
        get_task(task)  # an unknown name fails here, naming the known ones
        source = _held_out_file(plan, task, folder)
        rendered = folder / f"{name}.jsonl"
        records = [
            {
                "task": task,
                "prompt": tokenizer.apply_chat_template(
                    ex.prompt, tokenize=False, add_generation_prompt=True
                ),
                "reference": ex.completion,
            }
            for ex in load_jsonl(source)
        ]
        write_jsonl(rendered, records)
        scorer = "process_results_general" if task == "general" else "process_results"
        text = _template("generate.yaml.tmpl").substitute(
            task=name,
            data_file=json.dumps(str(rendered.resolve())),
            until=json.dumps([tokenizer.eos_token]),
            max_gen_toks=get_task(task).max_tokens,
            process_results=f"training.harness_eval.{scorer}",
            metrics=_metrics_yaml(generation_metrics(task)),
        )
        (folder / f"{name}.yaml").write_text(text)
    return folder


def _held_out_file(plan: HarnessPlan, task: str, folder: Path) -> Path:
    if plan.data_dir is not None and (plan.data_dir / task / "eval.jsonl").is_file():
        return plan.data_dir / task / "eval.jsonl"
    if task == "general":  # fixed set: no data folder needed
        path = folder / "general.source.jsonl"
        write_jsonl(path, general_records())
        return path
    where = plan.data_dir / task / "eval.jsonl" if plan.data_dir else "--data (not given)"
    raise HarnessError(f"task {task!r} needs its held-out set: {where} (tenantlora data generate)")


# ---- the server ------------------------------------------------------------------------------


def _error_message(response: httpx.Response) -> str:
    try:
        return response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return response.text[:300]


def check_model(plan: HarnessPlan) -> tuple[str, int]:
    """The model's name and context length, after one real completion through the endpoint
    lm-eval uses; a refusal (bad key, a model the tenant cannot see) is a HarnessError carrying
    the server's own message."""
    headers = {"Authorization": f"Bearer {plan.api_key}"} if plan.api_key else {}
    try:
        listing = httpx.get(f"{plan.server}/v1/models", headers=headers, timeout=60)
    except httpx.HTTPError as exc:
        raise HarnessError(f"no server at {plan.server}: {exc}") from exc
    if listing.status_code != 200:
        raise HarnessError(
            f"{plan.server}/v1/models: HTTP {listing.status_code}: {_error_message(listing)}"
        )
    models = listing.json()["data"]
    base = next(m for m in models if m.get("parent") is None)
    model = plan.model or base["id"]
    probe = httpx.post(
        f"{plan.server}/v1/completions",
        headers=headers,
        json={"model": model, "prompt": "Hello", "max_tokens": 1, "temperature": 0},
        timeout=plan.timeout,
    )
    if probe.status_code != 200:
        visible = ", ".join(m["id"] for m in models)
        raise HarnessError(
            f"the server refused model {model!r}: HTTP {probe.status_code}: "
            f"{_error_message(probe)} (models this key sees: {visible})"
        )
    return model, int(base.get("max_model_len") or 2048)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def started_server(
    base: str, loras: dict[str, str], log_path: Path, settings: dict[str, str] | None = None
) -> Iterator[str]:
    """`tenantlora serve` with `loras` as static adapters on a free port; stopped on exit.
    `settings`: TENANTLORA_* variables for that server only (e.g. its dtype)."""
    port = _free_port()
    cmd = [sys.executable, "-m", "serving.cli", "serve", "--port", str(port), "--base-model", base]
    for name, path in loras.items():
        cmd += ["--lora", f"{name}={path}"]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(settings or {})}
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            if proc.poll() is not None:
                raise HarnessError(f"the server exited with {proc.returncode}; see {log_path}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise HarnessError(f"the server was not up in {STARTUP_TIMEOUT:.0f} s")
            time.sleep(1)
        yield url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# ---- the run ---------------------------------------------------------------------------------


def _stderr(value) -> float | None:
    return float(value) if isinstance(value, int | float) else None


def _sample(task: str, s: dict) -> dict:
    doc = s["doc"]
    if task == MC_TASK:
        return {
            "question": doc["question"],
            "choices": doc["choices"],
            "answer": doc["choices"][doc["answer"]],
            "loglikelihoods": [r[0] for r in s["filtered_resps"]],
            "acc": s["acc"],
        }
    return {
        "prompt": doc["prompt"],
        "output": s["filtered_resps"][0],
        "reference": doc["reference"],
        "score": s["score"],
    }


def run(plan: HarnessPlan) -> HarnessResult:
    """Check the model through the server, write the task folder, run lm-eval in-process."""
    started = time.perf_counter()
    model, max_length = check_model(plan)
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    import lm_eval
    from lm_eval.tasks import TaskManager
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(plan.tokenizer))
    folder = write_task_folder(plan, tokenizer)
    names = [PREFIX + t for t in plan.tasks]
    model_args = {
        "model": model,
        "base_url": f"{plan.server}/v1/completions",
        "tokenizer": str(plan.tokenizer),
        "tokenizer_backend": "huggingface",
        "tokenized_requests": False,
        "num_concurrent": plan.concurrency,
        "max_length": max_length,
        "timeout": plan.timeout,
    }
    previous_key = os.environ.get("OPENAI_API_KEY")
    os.environ["OPENAI_API_KEY"] = plan.api_key or ""  # what local-completions sends
    try:
        out = lm_eval.simple_evaluate(
            model="local-completions",
            model_args=model_args,
            tasks=names,
            limit=plan.limit,
            task_manager=TaskManager(include_path=str(folder), include_defaults=False),
            log_samples=True,
        )
    finally:
        if previous_key is None:
            os.environ.pop("OPENAI_API_KEY", None)
        else:
            os.environ["OPENAI_API_KEY"] = previous_key
    if out is None:
        raise HarnessError("lm-eval returned no results")
    rows, samples = [], {}
    for task, name in zip(plan.tasks, names, strict=True):
        metrics = ["acc", "acc_norm"] if task == MC_TASK else generation_metrics(task)
        figures = out["results"][name]
        n = int(out["n-samples"][name]["effective"])
        for metric in metrics:
            rows.append(
                Row(
                    name,
                    metric,
                    float(figures[f"{metric},none"]),
                    _stderr(figures.get(f"{metric}_stderr,none")),
                    n,
                )
            )
        samples[name] = [_sample(task, s) for s in out["samples"][name]]
    return HarnessResult(
        server=plan.server,
        model=model,
        rows=rows,
        samples=samples,
        command=_command(model_args, folder, names, plan.limit),
        lm_eval_version=_version(),
        limit=plan.limit,
        elapsed_s=round(time.perf_counter() - started, 1),
    )


def _version() -> str:
    from importlib.metadata import version

    return version("lm-eval")


def _command(model_args: dict, folder: Path, names: list[str], limit: int | None) -> str:
    """The same run with lm-eval's own command line (the key left to the environment)."""
    args = ",".join(f"{k}={v}" for k, v in model_args.items())
    cmd = (
        "OPENAI_API_KEY=$TENANTLORA_API_KEY HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 "
        f"lm_eval --model local-completions --model_args {args} "
        f"--include_path {folder} --tasks {','.join(names)}"
    )
    return cmd + (f" --limit {limit}" if limit else "")


def markdown(result: HarnessResult) -> str:
    lines = [
        f"lm-eval-harness {result.lm_eval_version}, model `{result.model}` at {result.server}",
        "",
        "| task | metric | value | stderr | n |",
        "|---|---|---|---|---|",
    ]
    for r in result.rows:
        err = "-" if r.stderr is None else f"{r.stderr:.4f}"
        lines.append(f"| {r.task} | {r.metric} | {r.value:.4f} | {err} | {r.n} |")
    return "\n".join(lines) + "\n"


def write_report(result: HarnessResult, out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "harness.json", out / "harness.md"
    json_path.write_text(json.dumps(asdict(result), indent=2) + "\n")
    md_path.write_text(markdown(result))
    return json_path, md_path


# ---- command line (flags added to `tenantlora eval`) -----------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("--harness (lm-eval-harness against a served model)")
    g.add_argument(
        "--harness", action="store_true", help="run lm-eval-harness through the OpenAI endpoint"
    )
    g.add_argument(
        "--server",
        default=os.environ.get("TENANTLORA_URL", "http://127.0.0.1:8000"),
        help="a running tenantlora server (default: $TENANTLORA_URL, else 127.0.0.1:8000)",
    )
    g.add_argument(
        "--start",
        action="store_true",
        help="start `tenantlora serve` for the run instead, the --lora adapters (NAME=PATH) static",
    )
    g.add_argument("--model", help="adapter name or the base (default: the one --lora, else base)")
    g.add_argument("--limit", type=int, default=None, help="items per task")
    g.add_argument(
        "--api-key",
        default=os.environ.get("TENANTLORA_API_KEY"),
        help="tenant API key (default: $TENANTLORA_API_KEY)",
    )
    g.add_argument("--tokenizer", help="tokenizer folder (default: the --base model's)")
    g.add_argument("--concurrency", type=int, default=8, help="requests in flight")


def _base_folder(base: str) -> Path:
    from serving.base_model import resolve_base_model
    from serving.settings import Settings

    return resolve_base_model(base, Settings().models_dir)


def cmd_harness(args: argparse.Namespace) -> int:
    data_dir = Path(args.data) if args.data else None
    loras = {name: path for name, path in (v.split("=", 1) for v in args.lora or [])}
    model = args.model or (next(iter(loras)) if args.start and len(loras) == 1 else None)
    out = Path(args.out or "harness-eval")
    plan = HarnessPlan(
        server=args.server.rstrip("/"),
        model=model,
        tokenizer=Path(args.tokenizer or _base_folder(args.base)),
        out=out,
        tasks=args.tasks.split(",") if args.tasks else default_tasks(data_dir),
        data_dir=data_dir,
        limit=args.limit,
        api_key=args.api_key,
        concurrency=args.concurrency,
    )
    try:
        with contextlib.ExitStack() as stack:
            if args.start:
                log = out / "server.log"
                plan.server = stack.enter_context(started_server(args.base, loras, log))
            result = run(plan)
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    json_path, md_path = write_report(result, out)
    print(markdown(result))
    print(f"wrote {json_path} and {md_path}")
    return 0

"""Held-out scores through vLLM, the engine the server runs.

One evaluation plan lists models: the base (with LoRA/QLoRA adapters applied per request through
`LoRARequest`, exactly as the server does) and full checkpoints (full fine-tunes, merged models),
which each need their own engine. Each engine runs in its own process (`tenantlora eval-engine
SPEC OUT`): vLLM spawns workers, and one process per engine releases its memory cleanly. Generation is greedy through `LLM.chat`, i.e. the model's chat template, like the
server's chat route. Every model is also scored on the fixed general set (the forgetting check).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from training.data import load_jsonl
from training.tasks import get_task

log = logging.getLogger(__name__)
SAMPLES_KEPT = 3


@dataclass
class Run:
    """One (variant, task) cell: `adapter` is None for the engine's own weights."""

    label: str  # e.g. "base", "lora", "full", "merged"
    task: str  # task the variant was trained for ("base" variants: every task)
    data: str  # held-out JSONL with the references
    eval_task: str  # scorer to use: a task name or "general"
    adapter: str | None = None


@dataclass
class EngineSpec:
    model: str
    runs: list[Run]
    max_lora_rank: int = 16
    max_loras: int = 2
    memory_share: float | None = None  # None: Settings' default
    kv_cache_gib: float | None = None  # None: Settings' default (a fixed 2 GiB on a CPU)
    enforce_eager: bool = False
    max_model_len: int = 1024
    max_num_seqs: int = 32
    dtype: str = "auto"  # as `tenantlora serve` picks it (serving.hardware.resolve_dtype)


@dataclass
class Cell:
    label: str
    task: str
    eval_task: str
    model: str
    adapter: str | None
    score: float
    n: int
    samples: list[dict] = field(default_factory=list)


def _engine_kwargs(spec: EngineSpec, lora: bool) -> dict:
    """The server's engine arguments (serving.engine.engine_kwargs over serving.settings), with
    the spec's overrides and a fixed seed."""
    from serving.engine import engine_kwargs
    from serving.settings import Settings

    overrides = dict(
        memory_share=spec.memory_share,
        kv_cache_gib=spec.kv_cache_gib,
        dtype=spec.dtype,
        max_model_len=spec.max_model_len,
        max_num_seqs=spec.max_num_seqs,
        enforce_eager=spec.enforce_eager,
        max_loras=spec.max_loras,
        max_lora_rank=spec.max_lora_rank,
    )
    settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    return {**engine_kwargs(settings, spec.model, lora=lora), "seed": 0}


def run_engine(spec: EngineSpec) -> list[Cell]:
    """Build one vLLM engine and score every run of `spec` in one batched `chat` call."""
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    from serving.settings import Settings

    os.environ.setdefault("TENANTLORA_CPU_LORA_OPS", "1" if Settings().cpu_lora_ops else "0")
    adapters = sorted({r.adapter for r in spec.runs if r.adapter})
    lora_ids = {path: i + 1 for i, path in enumerate(adapters)}
    started = time.perf_counter()
    llm = LLM(**_engine_kwargs(spec, lora=bool(adapters)))
    log.info("engine for %s up in %.1f s", spec.model, time.perf_counter() - started)

    conversations, params, requests, owners = [], [], [], []
    for index, run in enumerate(spec.runs):
        task = get_task(run.eval_task)
        request = (
            LoRARequest(f"a{lora_ids[run.adapter]}", lora_ids[run.adapter], run.adapter)
            if run.adapter
            else None
        )
        for example in load_jsonl(run.data):
            conversations.append(example.prompt)
            params.append(SamplingParams(temperature=0.0, max_tokens=task.max_tokens))
            requests.append(request)
            owners.append((index, example.completion))
    outputs = llm.chat(conversations, sampling_params=params, lora_request=requests, use_tqdm=True)

    totals: dict[int, list[float]] = {i: [] for i in range(len(spec.runs))}
    samples: dict[int, list[dict]] = {i: [] for i in range(len(spec.runs))}
    for conversation, output, (index, reference) in zip(
        conversations, outputs, owners, strict=True
    ):
        text = output.outputs[0].text
        score = get_task(spec.runs[index].eval_task).score(text, reference)
        totals[index].append(score)
        if len(samples[index]) < SAMPLES_KEPT:
            samples[index].append(
                {
                    "prompt": conversation[-1]["content"],
                    "output": text,
                    "reference": reference,
                    "score": score,
                }
            )
    return [
        Cell(
            run.label,
            run.task,
            run.eval_task,
            spec.model,
            run.adapter,
            sum(totals[i]) / len(totals[i]),
            len(totals[i]),
            samples[i],
        )
        for i, run in enumerate(spec.runs)
    ]


def run_engine_subprocess(spec: EngineSpec, timeout: float | None = None) -> list[Cell]:
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(asdict(spec)))
        # On a shared, busy CPU one engine step can take minutes; vLLM's default 300 s RPC
        # timeout would then kill the engine.
        env = dict(os.environ)
        env.setdefault("VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS", "3600")
        # vLLM's CPU default pins its threads to fixed cores (core 0 here, for every engine on the
        # host); on a shared machine letting the OS place them is much faster.
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        subprocess.run(
            [sys.executable, "-m", "serving.cli", "eval-engine", str(spec_path), str(out_path)],
            check=True,
            timeout=timeout,
            env=env,
        )
        return [Cell(**c) for c in json.loads(out_path.read_text())]


def run_spec_file(spec_path: Path, out_path: Path) -> None:
    """Score the engine spec in ``spec_path`` (JSON) and write its cells to ``out_path``."""
    raw = json.loads(Path(spec_path).read_text())
    raw["runs"] = [Run(**r) for r in raw["runs"]]
    cells = run_engine(EngineSpec(**raw))
    Path(out_path).write_text(json.dumps([asdict(c) for c in cells], indent=2))


@dataclass
class EvalPlan:
    """What to evaluate: the base on every task, and per task the trained variants."""

    base: str  # checkpoint folder
    data_dir: Path  # <task>/eval.jsonl and general/eval.jsonl (tenantlora data generate)
    tasks: list[str]
    adapters: dict[str, dict[str, str]] = field(default_factory=dict)  # label -> task -> path
    checkpoints: dict[str, dict[str, str]] = field(default_factory=dict)  # label -> task -> dir
    max_lora_rank: int = 16
    memory_share: float | None = None
    kv_cache_gib: float | None = None
    enforce_eager: bool = False
    include_base: bool = True  # False: skip the base model's own scores (already measured)
    dtype: str = "auto"  # float32 scores what fp32 training made (bf16 rounds small updates)

    def engines(self) -> list[EngineSpec]:
        general = str(self.data_dir / "general" / "eval.jsonl")

        def held_out(task: str) -> str:
            return str(self.data_dir / task / "eval.jsonl")

        common = dict(
            max_lora_rank=self.max_lora_rank,
            memory_share=self.memory_share,
            kv_cache_gib=self.kv_cache_gib,
            enforce_eager=self.enforce_eager,
            dtype=self.dtype,
        )
        runs = []
        if self.include_base:
            runs = [Run("base", t, held_out(t), t) for t in self.tasks]
            runs.append(Run("base", "-", general, "general"))
        for label, per_task in self.adapters.items():
            for task, path in per_task.items():
                runs.append(Run(label, task, held_out(task), task, adapter=str(path)))
                runs.append(Run(label, task, general, "general", adapter=str(path)))
        specs = [EngineSpec(self.base, runs, **common)] if runs else []
        for label, per_task in self.checkpoints.items():
            for task, path in per_task.items():
                specs.append(
                    EngineSpec(
                        str(path),
                        [
                            Run(label, task, held_out(task), task),
                            Run(label, task, general, "general"),
                        ],
                        **common,
                    )
                )
        return specs


def evaluate(plan: EvalPlan, progress: bool = True) -> list[Cell]:
    """Run every engine of the plan, one after the other, each in its own process."""
    from tqdm import tqdm

    cells: list[Cell] = []
    specs = plan.engines()
    for spec in tqdm(specs, desc="eval engines", unit="engine", disable=not progress):
        cells.extend(run_engine_subprocess(spec))
    return cells


def summarize(cells: list[Cell]) -> dict:
    """{label: {task: {"score", "general", "n"}}} with the general (forgetting) score beside."""
    out: dict[str, dict[str, dict]] = {}
    base_general = next(
        (c.score for c in cells if c.label == "base" and c.eval_task == "general"), None
    )
    for c in cells:
        if c.eval_task == "general":
            continue
        entry = out.setdefault(c.label, {}).setdefault(c.task, {})
        entry.update(score=c.score, n=c.n)
    for c in cells:
        if c.eval_task != "general":
            continue
        tasks = out.get(c.label, {})
        targets = tasks if c.task == "-" else {c.task: tasks.setdefault(c.task, {})}
        for entry in targets.values():
            entry["general"] = c.score
            if base_general is not None:
                entry["forgetting"] = base_general - c.score
    return out

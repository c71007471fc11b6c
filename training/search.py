"""Recipe search: `tenantlora train lora|full --search`.

Tries a small grid of recipes (learning rate x steps or epochs x LoRA rank), optionally as
successive halving: with R rounds, round r trains every surviving candidate at 2^(r-R) of its
step budget (from scratch: the learning-rate schedule depends on the budget), scores it, and the
better half goes on; the last round is the full budget. `--search-rounds 1` is a plain grid.

Each candidate is scored through vLLM exactly as `tenantlora eval` scores a model
(`training.evaluate`): greedy on the task's held-out set and on the general (forgetting) set.
The pick rule (`pick`) takes the best task score among candidates whose general score is at most
`max_forgetting` points below the base's; if none qualifies it takes the least-forgetting one
and says so. Every candidate's figures go to `search_report.{json,md}` in the output folder,
which then holds only the chosen candidate's artifact.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from training.config import TrainConfig
from training.data import load_jsonl
from training.report import TrainingReport
from training.tasks import general_records, get_task, write_jsonl

log = logging.getLogger(__name__)
REPORT_STEM = "search_report"
WORK_DIR = "_search"
DEFAULT_LEARNING_RATES = {
    "lora": (1e-4, 3e-4, 1e-3),
    "qlora": (1e-4, 3e-4, 1e-3),
    "full": (5e-6, 1e-5, 3e-5),
}
DEFAULT_RANKS = (8, 16)
DEFAULT_MAX_FORGETTING = 5.0  # points of the general set
VLLM_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts


class SearchError(RuntimeError):
    """The search cannot run as asked; the message says why."""


@dataclass(frozen=True)
class Recipe:
    learning_rate: float
    steps: int  # optimizer steps at the full budget; <= 0: train for `epochs`
    epochs: float
    rank: int | None  # LoRA rank (alpha keeps the config's alpha/rank ratio); None: full

    @property
    def name(self) -> str:
        budget = f"s{self.steps}" if self.steps > 0 else f"e{self.epochs:g}"
        rank = f"-r{self.rank}" if self.rank is not None else ""
        return f"lr{self.learning_rate:g}{rank}-{budget}"

    def budget(self, fraction: float) -> tuple[int, float]:
        """(max_steps, epochs) at `fraction` of the full budget (at least one step)."""
        if self.steps > 0:
            return max(1, math.ceil(self.steps * fraction)), self.epochs
        return 0, self.epochs * fraction


@dataclass
class SearchSpace:
    learning_rates: tuple[float, ...]
    steps: tuple[int, ...]
    epochs: tuple[float, ...]
    ranks: tuple[int | None, ...]

    @classmethod
    def default(
        cls,
        cfg: TrainConfig,
        learning_rates: Sequence[float] = (),
        steps: Sequence[int] = (),
        epochs: Sequence[float] = (),
        ranks: Sequence[int] = (),
    ) -> SearchSpace:
        """The default grid for `cfg`'s method (budget: the config's steps or epochs); a
        non-empty argument replaces its axis. Searching epochs means training by epochs."""
        if steps and epochs:
            raise SearchError("search steps or epochs, not both")
        if epochs:
            steps = (0,)
        elif not steps:
            steps = (cfg.max_steps,)
        return cls(
            learning_rates=tuple(learning_rates or DEFAULT_LEARNING_RATES[cfg.method]),
            steps=tuple(steps),
            epochs=tuple(epochs or (cfg.epochs,)),
            ranks=tuple(ranks or DEFAULT_RANKS) if cfg.uses_adapter else (None,),
        )

    def grid(self) -> list[Recipe]:
        budgets = [(s, 1.0) for s in self.steps if s > 0]
        if any(s <= 0 for s in self.steps):
            budgets += [(0, e) for e in self.epochs]
        return [
            Recipe(lr, s, e, r)
            for lr in self.learning_rates
            for r in self.ranks
            for s, e in budgets
        ]


@dataclass
class Candidate:
    """One recipe and its figures in the last round it reached."""

    recipe: Recipe
    round: int = 0
    steps: int = 0
    epochs: float = 0.0
    task_score: float | None = None  # [0, 1] on the held-out set
    general_score: float | None = None  # [0, 1] on the general set
    forgetting: float | None = None  # points: 100 * (base general - general)
    eval_loss: float | None = None  # held-out loss after training
    train_time_s: float | None = None
    trainable_share: float | None = None
    artifact: str | None = None
    status: str = "pending"  # "finalist", "dropped in round k"
    history: list[dict] = field(default_factory=list)  # one entry per round trained

    @property
    def name(self) -> str:
        return self.recipe.name

    def to_dict(self) -> dict:
        return {"name": self.name, **asdict(self)}


@dataclass
class Pick:
    candidate: Candidate
    within_budget: bool
    note: str


def forgetting_points(base_general: float, general: float) -> float:
    return 100.0 * (base_general - general)


def rank(
    candidates: Sequence[Candidate], base_general: float, max_forgetting: float
) -> list[Candidate]:
    """Best first: candidates within the forgetting budget by task score (then less forgetting,
    lower held-out loss), then the rest by least forgetting (then task score). Unscored
    candidates come last."""

    def key(c: Candidate) -> tuple:
        if c.task_score is None or c.general_score is None:
            return (2, 0.0, 0.0, 0.0)
        lost = forgetting_points(base_general, c.general_score)
        loss = c.eval_loss if c.eval_loss is not None else math.inf
        if lost <= max_forgetting + 1e-9:
            return (0, -c.task_score, lost, loss)
        return (1, lost, -c.task_score, loss)

    return sorted(candidates, key=key)


def pick(candidates: Sequence[Candidate], base_general: float, max_forgetting: float) -> Pick:
    """The best task score within `max_forgetting` points of the base's general score; if no
    candidate is within budget, the least-forgetting one, flagged."""
    scored = [c for c in candidates if c.task_score is not None and c.general_score is not None]
    if not scored:
        raise SearchError("no candidate was scored")
    best = rank(scored, base_general, max_forgetting)[0]
    lost = forgetting_points(base_general, best.general_score)
    if lost <= max_forgetting + 1e-9:
        note = (
            f"{best.name}: best task score {100 * best.task_score:.1f} within the forgetting "
            f"budget ({lost:.1f} <= {max_forgetting:g} points)"
        )
        return Pick(best, True, note)
    note = (
        f"no candidate within the forgetting budget of {max_forgetting:g} points; chose the "
        f"least-forgetting one, {best.name} ({lost:.1f} points, task score "
        f"{100 * best.task_score:.1f})"
    )
    return Pick(best, False, note)


@dataclass
class SearchOptions:
    space: SearchSpace
    rounds: int = 2
    max_forgetting: float = DEFAULT_MAX_FORGETTING
    task: str | None = None  # scorer; None: the held-out records' "task"
    eval_limit: int | None = None  # score at most this many held-out / general examples
    kv_cache_gib: float | None = None
    memory_share: float | None = None
    enforce_eager: bool = False
    dtype: str = "auto"  # scoring engine's dtype (see `tenantlora eval --dtype`)


@dataclass
class Scores:
    """One round's scores: (task, general) per candidate name, and the base's if measured."""

    candidates: dict[str, tuple[float, float]]
    base: tuple[float, float] | None = None


TrainFn = Callable[[TrainConfig], TrainingReport]
ScoreFn = Callable[..., Scores]


def _vllm_rank(ranks: Sequence[int | None]) -> int:
    need = max([r for r in ranks if r] or [8])
    return next(r for r in VLLM_RANKS if r >= need)


def score_round(
    base: str,
    artifacts: dict[str, Path],
    *,
    adapters: bool,
    held_out: Path,
    general: Path,
    task: str,
    with_base: bool,
    options: SearchOptions,
) -> Scores:
    """Score the artifacts (and the base) through vLLM: adapters on one base engine, full
    checkpoints each on their own (`training.evaluate`)."""
    from training.evaluate import EngineSpec, Run, run_engine_subprocess

    common = dict(
        max_lora_rank=_vllm_rank(options.space.ranks),
        memory_share=options.memory_share,
        kv_cache_gib=options.kv_cache_gib,
        enforce_eager=options.enforce_eager,
        dtype=options.dtype,
    )

    def runs(label: str, adapter: str | None) -> list[Run]:
        return [
            Run(label, task, str(held_out), task, adapter=adapter),
            Run(label, task, str(general), "general", adapter=adapter),
        ]

    specs: list[EngineSpec] = []
    base_runs = runs("base", None) if with_base else []
    if adapters:
        all_runs = base_runs + [r for n, p in artifacts.items() for r in runs(n, str(p))]
        specs.append(EngineSpec(base, all_runs, max_loras=min(4, max(1, len(artifacts))), **common))
    else:
        if base_runs:
            specs.append(EngineSpec(base, base_runs, **common))
        specs += [EngineSpec(str(p), runs(n, None), **common) for n, p in artifacts.items()]
    figures: dict[str, dict[str, float]] = {}
    for spec in specs:
        for cell in run_engine_subprocess(spec):
            kind = "general" if cell.eval_task == "general" else "task"
            figures.setdefault(cell.label, {})[kind] = cell.score
    pair = {label: (f["task"], f["general"]) for label, f in figures.items()}
    return Scores({n: pair[n] for n in artifacts}, pair.get("base"))


@dataclass
class SearchResult:
    candidates: list[Candidate]
    pick: Pick
    base_task: float
    base_general: float
    report: dict


def _limited(src: list[dict], path: Path, limit: int | None) -> int:
    records = src[:limit] if limit else src
    write_jsonl(path, records)
    return len(records)


def _held_out_records(path: Path) -> list[dict]:
    return [
        {"task": e.task, "messages": [*e.prompt, {"role": "assistant", "content": e.completion}]}
        for e in load_jsonl(path)
    ]


def _scorer(options: SearchOptions, held_out: list[dict]) -> str:
    if options.task:
        get_task(options.task)  # raises on an unknown name
        return options.task
    names = {r["task"] for r in held_out}
    if len(names) != 1 or None in names:
        raise SearchError(
            "the held-out records do not name one task; pass --search-task "
            "(a task of `tenantlora data generate`) to choose the scorer"
        )
    name = names.pop()
    get_task(name)
    return name


def _candidate_config(cfg: TrainConfig, recipe: Recipe, fraction: float, out: Path) -> TrainConfig:
    steps, epochs = recipe.budget(fraction)
    extra = {}
    if recipe.rank is not None:
        extra = dict(
            lora_r=recipe.rank,
            lora_alpha=max(1, round(recipe.rank * cfg.lora_alpha / cfg.lora_r)),
        )
    return replace(
        cfg,
        out=out,
        learning_rate=recipe.learning_rate,
        max_steps=steps,
        epochs=epochs,
        eval_before=False,
        **extra,
    )


def _log_line(c: Candidate, rounds: int) -> str:
    budget = f"{c.steps} steps" if c.steps > 0 else f"{c.epochs:g} epochs"
    loss = f"{c.eval_loss:.3f}" if c.eval_loss is not None else "-"
    return (
        f"search round {c.round}/{rounds} {c.name}: {budget}, task {100 * c.task_score:.1f}, "
        f"general {100 * c.general_score:.1f}, forgetting {c.forgetting:+.1f} pts, "
        f"held-out loss {loss}, train {c.train_time_s:.0f} s"
    )


def search(
    cfg: TrainConfig,
    options: SearchOptions,
    *,
    train_fn: TrainFn | None = None,
    score_fn: ScoreFn = score_round,
) -> SearchResult:
    """Run the search for `cfg` (its recipe fields are the defaults the grid varies) and leave
    the chosen artifact and the report in `cfg.out`."""
    from serving.base_model import resolve_base_model
    from serving.settings import Settings

    if train_fn is None:
        from training.trainer import train as train_fn
    if cfg.eval_data is None:
        raise SearchError("--search needs --eval-data (the held-out set it scores on)")
    if options.rounds < 1:
        raise SearchError("--search-rounds must be at least 1")
    out = Path(cfg.out)
    if out.exists() and any(p.name != WORK_DIR for p in out.iterdir()):
        raise SearchError(f"{out} is not empty; the search writes its chosen artifact there")
    started = time.perf_counter()
    base = str(resolve_base_model(cfg.base, Settings().models_dir))
    cfg = replace(cfg, base=base)
    work = out / WORK_DIR
    shutil.rmtree(work, ignore_errors=True)
    held_out_path = Path(cfg.eval_data)
    held_out_src = _held_out_records(held_out_path)
    task = _scorer(options, held_out_src)
    held_out, general = work / "data" / "held_out.jsonl", work / "data" / "general.jsonl"
    n_held_out = _limited(held_out_src, held_out, options.eval_limit)
    n_general = _limited(general_records(), general, options.eval_limit)
    cfg = replace(cfg, eval_data=held_out)

    candidates = [Candidate(r) for r in options.space.grid()]
    if not candidates:
        raise SearchError("the search space is empty")
    log.info(
        "search: %d candidates, %d round(s), task %s, %d held-out / %d general examples",
        len(candidates),
        options.rounds,
        task,
        n_held_out,
        n_general,
    )
    alive = list(candidates)
    base_scores: tuple[float, float] | None = None
    r = 1
    while True:
        # With one candidate left there is nothing to halve: go straight to the full budget.
        if len(alive) == 1:
            r = options.rounds
        fraction = 2.0 ** (r - options.rounds)
        artifacts: dict[str, Path] = {}
        for c in alive:
            path = work / f"r{r}-{c.name}"
            report = train_fn(_candidate_config(cfg, c.recipe, fraction, path))
            artifacts[c.name] = path
            c.round, c.artifact = r, str(path)
            c.steps, c.epochs = report.steps, float(report.config.get("epochs", c.recipe.epochs))
            c.eval_loss, c.train_time_s = report.eval_loss_final, report.wall_time_s
            c.trainable_share = report.trainable_share
        scores = score_fn(
            base,
            artifacts,
            adapters=cfg.uses_adapter,
            held_out=held_out,
            general=general,
            task=task,
            with_base=base_scores is None,
            options=options,
        )
        if base_scores is None:
            base_scores = scores.base
            log.info(
                "search: base task %.1f, general %.1f",
                100 * base_scores[0],
                100 * base_scores[1],
            )
        for c in alive:
            c.task_score, c.general_score = scores.candidates[c.name]
            c.forgetting = forgetting_points(base_scores[1], c.general_score)
            c.history.append(
                {
                    k: getattr(c, k)
                    for k in (
                        "round",
                        "steps",
                        "epochs",
                        "task_score",
                        "general_score",
                        "forgetting",
                        "eval_loss",
                        "train_time_s",
                    )
                }
            )
            log.info(_log_line(c, options.rounds))
        if r >= options.rounds:
            break
        ranked = rank(alive, base_scores[1], options.max_forgetting)
        keep = max(1, math.ceil(len(ranked) / 2))
        for c in ranked[keep:]:
            c.status = f"dropped in round {r}"
        for c in alive:  # survivors retrain from scratch at the next budget
            shutil.rmtree(c.artifact, ignore_errors=True)
            c.artifact = None
        alive = ranked[:keep]
        r += 1

    for c in alive:
        c.status = "finalist"
    chosen = pick(alive, base_scores[1], options.max_forgetting)
    chosen.candidate.status = "chosen"
    _install(Path(chosen.candidate.artifact), out)
    for c in candidates:
        c.artifact = str(out) if c is chosen.candidate else None
    shutil.rmtree(work, ignore_errors=True)
    log.info("search: %s", chosen.note)

    report = {
        "method": cfg.method,
        "base": base,
        "data": str(cfg.data),
        "held_out": str(held_out_path),
        "task": task,
        "n_held_out": n_held_out,
        "n_general": n_general,
        "rounds": options.rounds,
        "max_forgetting": options.max_forgetting,
        "space": asdict(options.space),
        "base_scores": {"task": base_scores[0], "general": base_scores[1]},
        "chosen": chosen.candidate.name,
        "within_budget": chosen.within_budget,
        "note": chosen.note,
        "artifact": str(out),
        "wall_time_s": time.perf_counter() - started,
        "candidates": [c.to_dict() for c in candidates],
    }
    write_report(report, out)
    return SearchResult(candidates, chosen, base_scores[0], base_scores[1], report)


def _install(artifact: Path, out: Path) -> None:
    """Move the chosen artifact's files into `out` and point its training report at them."""
    out.mkdir(parents=True, exist_ok=True)
    for item in artifact.iterdir():
        shutil.move(str(item), str(out / item.name))
    report_path = out / "training_report.json"
    if report_path.is_file():
        report = json.loads(report_path.read_text())
        report.setdefault("config", {})["out"] = str(out)
        report_path.write_text(json.dumps(report, indent=2) + "\n")


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def write_report(report: dict, out: Path) -> tuple[Path, Path]:
    """`search_report.json` and `search_report.md` in `out`."""
    json_path, md_path = out / f"{REPORT_STEM}.json", out / f"{REPORT_STEM}.md"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    base = report["base_scores"]
    lines = [
        f"# Recipe search: {report['method']} on {report['task']}",
        "",
        f"{len(report['candidates'])} candidates, "
        + (
            f"{report['rounds']} rounds of successive halving"
            if report["rounds"] > 1
            else "plain grid"
        )
        + f"; scored through vLLM on {report['n_held_out']} held-out and "
        f"{report['n_general']} general examples. Base: task {_pct(base['task'])}, general "
        f"{_pct(base['general'])}. Forgetting budget: {report['max_forgetting']:g} points.",
        "",
        "| candidate | lr | rank | budget | round | task | general | forgetting (pts) | "
        "held-out loss | train time | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in report["candidates"]:
        recipe = c["recipe"]
        budget = f"{c['steps']} steps" if c["steps"] > 0 else f"{c['epochs']:g} epochs"
        loss = "–" if c["eval_loss"] is None else f"{c['eval_loss']:.3f}"
        lost = "–" if c["forgetting"] is None else f"{c['forgetting']:.1f}"
        seconds = "–" if c["train_time_s"] is None else f"{c['train_time_s']:.0f} s"
        lines.append(
            f"| {c['name']} | {recipe['learning_rate']:g} | {recipe['rank'] or '–'} | {budget} | "
            f"{c['round']} | {_pct(c['task_score'])} | {_pct(c['general_score'])} | {lost} | "
            f"{loss} | {seconds} | {c['status']} |"
        )
    verdict = "" if report["within_budget"] else "**No candidate was within budget.** "
    lines += ["", f"Chosen: **{report['chosen']}**. {verdict}{report['note']}.", ""]
    md_path.write_text("\n".join(lines))
    return json_path, md_path


def _floats(text: str | None) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(",") if v.strip()) if text else ()


def _ints(text: str | None) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip()) if text else ()


def add_arguments(p) -> None:
    """The `--search` flags of `tenantlora train lora|qlora|full`."""
    g = p.add_argument_group("recipe search (--search)")
    g.add_argument(
        "--search",
        action="store_true",
        help="try a grid of recipes, score each through vLLM, keep the best within the "
        "forgetting budget (needs --eval-data); writes search_report.{json,md} in --out",
    )
    g.add_argument("--search-lr", help="learning rates, comma-separated (default per method)")
    g.add_argument("--search-steps", help="step budgets, comma-separated (default --max-steps)")
    g.add_argument("--search-epochs", help="epoch budgets instead of steps, comma-separated")
    g.add_argument(
        "--search-rank", help=f"LoRA ranks (default {','.join(map(str, DEFAULT_RANKS))})"
    )
    g.add_argument(
        "--search-rounds",
        type=int,
        default=2,
        help="successive-halving rounds (1: plain grid; round r trains at 2^(r-R) of the budget)",
    )
    g.add_argument(
        "--max-forgetting",
        type=float,
        default=DEFAULT_MAX_FORGETTING,
        help="points a candidate's general-set score may fall below the base's",
    )
    g.add_argument("--search-task", help="scorer (default: the held-out records' task)")
    g.add_argument("--search-eval-limit", type=int, help="score at most N examples per set")
    g.add_argument("--search-kv-cache-gib", type=float, help="scoring engine's KV cache")
    g.add_argument("--search-enforce-eager", action="store_true", help="skip graph compilation")
    g.add_argument(
        "--search-dtype",
        default="auto",
        choices=("auto", "float32", "bfloat16", "float16"),
        help="scoring engine's dtype (as `tenantlora eval --dtype`)",
    )


def run_from_args(cfg: TrainConfig, args) -> SearchResult:
    """`tenantlora train METHOD --search ...`: the search for `cfg` as the flags describe it."""
    space = SearchSpace.default(
        cfg,
        learning_rates=_floats(args.search_lr),
        steps=_ints(args.search_steps),
        epochs=_floats(args.search_epochs),
        ranks=_ints(args.search_rank),
    )
    options = SearchOptions(
        space=space,
        rounds=args.search_rounds,
        max_forgetting=args.max_forgetting,
        task=args.search_task,
        eval_limit=args.search_eval_limit,
        kv_cache_gib=args.search_kv_cache_gib,
        enforce_eager=args.search_enforce_eager,
        dtype=args.search_dtype,
    )
    return search(cfg, options)

"""Recipe search: the pick rule, the halving schedule, and one real tiny search (CLI, real base
model, real training, scores through vLLM)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from training.config import TrainConfig
from training.report import TrainingReport
from training.search import (
    Candidate,
    Recipe,
    Scores,
    SearchOptions,
    SearchSpace,
    pick,
    rank,
    search,
)

REPO = Path(__file__).resolve().parents[2]


def _cand(lr: float, task: float, general: float, loss: float = 1.0) -> Candidate:
    return Candidate(Recipe(lr, 8, 1.0, 8), task_score=task, general_score=general, eval_loss=loss)


def test_pick_best_task_score_within_budget() -> None:
    a, b, c = _cand(1e-4, 0.60, 1.00), _cand(3e-4, 0.80, 0.96), _cand(1e-3, 0.70, 0.98)
    chosen = pick([a, b, c], base_general=1.0, max_forgetting=5)
    assert chosen.candidate is b and chosen.within_budget
    # Ties on task score go to the one that forgets less.
    d = _cand(5e-4, 0.80, 1.00)
    assert pick([b, d], 1.0, 5).candidate is d


def test_pick_skips_over_budget_candidates_even_with_higher_task_score() -> None:
    ok, greedy = _cand(1e-4, 0.50, 0.95), _cand(1e-3, 1.00, 0.90)  # 5 and 10 points lost
    chosen = pick([greedy, ok], base_general=1.0, max_forgetting=5)
    assert chosen.candidate is ok and chosen.within_budget
    # A tighter budget excludes both: the least-forgetting one, flagged.
    tight = pick([greedy, ok], base_general=1.0, max_forgetting=2)
    assert tight.candidate is ok and not tight.within_budget
    assert "no candidate within" in tight.note


def test_pick_when_nothing_is_within_budget_takes_least_forgetting_and_flags_it() -> None:
    a, b, c = _cand(1e-4, 0.9, 0.50), _cand(3e-4, 0.2, 0.70), _cand(1e-3, 1.0, 0.30)
    chosen = pick([a, b, c], base_general=0.9, max_forgetting=5)
    assert chosen.candidate is b and not chosen.within_budget
    assert b.name in chosen.note
    assert [x.name for x in rank([a, b, c], 0.9, 5)] == [b.name, a.name, c.name]


def test_space_defaults_and_overrides(tmp_path: Path) -> None:
    lora = TrainConfig("lora", "b", tmp_path / "d.jsonl", tmp_path / "o", max_steps=64)
    grid = SearchSpace.default(lora).grid()
    assert len(grid) == 6 and {r.steps for r in grid} == {64} and {r.rank for r in grid} == {8, 16}
    custom = SearchSpace.default(lora, learning_rates=(1e-4,), epochs=(1, 2)).grid()
    assert [(r.steps, r.epochs) for r in custom] == [(0, 1), (0, 2), (0, 1), (0, 2)]
    full = TrainConfig("full", "b", tmp_path / "d.jsonl", tmp_path / "o")
    assert {r.rank for r in SearchSpace.default(full, ranks=(8,)).grid()} == {None}


def test_successive_halving_schedule(tmp_path: Path) -> None:
    """Round 1 trains all four at half the budget; the better half (by the pick rule) retrains at
    the full budget; the output keeps only the chosen artifact. Training and scoring are stubs
    here (the real ones are in the next test), so this checks the schedule alone."""
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    held_out = tmp_path / "eval.jsonl"
    held_out.write_text(
        json.dumps({"task": "intent", "prompt": "hi", "completion": "greeting"}) + "\n"
    )
    trained: list[tuple[float, int]] = []

    def fake_train(cfg: TrainConfig) -> TrainingReport:
        trained.append((cfg.learning_rate, cfg.max_steps))
        cfg.out.mkdir(parents=True)
        (cfg.out / "adapter_model.safetensors").write_text(str(cfg.learning_rate))
        fields = dict.fromkeys(TrainingReport.__dataclass_fields__, 0)
        fields.update(steps=cfg.max_steps, eval_loss_final=1.0, config=cfg.to_dict())
        report = TrainingReport(**fields)
        report.write(cfg.out / "training_report.json")
        return report

    # Task score grows with the rate; the largest rate forgets 20 points.
    def fake_score(base, artifacts, **_) -> Scores:
        figures = {}
        for name, path in artifacts.items():
            lr = float((Path(path) / "adapter_model.safetensors").read_text())
            figures[name] = (min(1.0, lr * 1000), 0.8 if lr >= 1e-3 else 1.0)
        return Scores(figures, (0.1, 1.0))

    cfg = TrainConfig("lora", str(base), held_out, tmp_path / "out", eval_data=held_out)
    space = SearchSpace((1e-4, 3e-4, 6e-4, 1e-3), (8,), (1.0,), (8,))
    result = search(
        cfg,
        SearchOptions(space, rounds=2, max_forgetting=5),
        train_fn=fake_train,
        score_fn=fake_score,
    )
    assert trained == [(1e-4, 4), (3e-4, 4), (6e-4, 4), (1e-3, 4), (6e-4, 8), (3e-4, 8)]
    assert result.pick.candidate.recipe.learning_rate == 6e-4 and result.pick.within_budget
    status = {c.recipe.learning_rate: c.status for c in result.candidates}
    assert status == {
        1e-4: "dropped in round 1",
        3e-4: "finalist",
        6e-4: "chosen",
        1e-3: "dropped in round 1",
    }
    out = tmp_path / "out"
    assert (out / "adapter_model.safetensors").read_text() == str(6e-4)
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_model.safetensors",
        "search_report.json",
        "search_report.md",
        "training_report.json",
    ]


@pytest.mark.engine
def test_tiny_real_search_keeps_only_the_chosen_adapter(
    tmp_path: Path, base_model_dir, intent_data
) -> None:
    """Two LoRA candidates, 2 steps each, through the CLI: real training on the real base, real
    scoring through vLLM on 4 held-out and 4 general examples."""
    train_path, eval_path = intent_data
    out = tmp_path / "searched"
    cmd = [sys.executable, "-m", "serving.cli", "train", "lora", "--base", str(base_model_dir)]
    cmd += ["--data", str(train_path), "--eval-data", str(eval_path), "--out", str(out)]
    cmd += ["--batch-size", "2", "--max-length", "96", "--logging-steps", "1"]
    cmd += ["--search", "--search-lr", "1e-4,2e-3", "--search-steps", "2"]
    cmd += ["--search-rank", "8", "--search-rounds", "1", "--search-eval-limit", "4"]
    cmd += ["--search-enforce-eager", "--search-kv-cache-gib", "0.5", "--max-forgetting", "5"]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    # One progress line per candidate, with its figures.
    lines = [ln for ln in done.stderr.splitlines() if "search round 1/1" in ln]
    assert len(lines) == 2 and all("task" in ln and "forgetting" in ln for ln in lines), lines

    report = json.loads((out / "search_report.json").read_text())
    assert len(report["candidates"]) == 2
    for c in report["candidates"]:
        assert c["steps"] == 2 and c["round"] == 1
        for key in ("task_score", "general_score", "forgetting", "eval_loss", "train_time_s"):
            assert c[key] is not None, (c["name"], key)
        assert c["forgetting"] == pytest.approx(
            100 * (report["base_scores"]["general"] - c["general_score"])
        )
    assert report["n_held_out"] == 4 and report["n_general"] == 4
    # The recorded choice is what the pick rule gives on the recorded figures.
    candidates = [
        Candidate(Recipe(**c["recipe"]), task_score=c["task_score"],
                  general_score=c["general_score"], eval_loss=c["eval_loss"])
        for c in report["candidates"]
    ]  # fmt: skip
    expected = pick(candidates, report["base_scores"]["general"], 5)
    assert report["chosen"] == expected.candidate.name
    assert report["within_budget"] == expected.within_budget
    assert [c["status"] for c in report["candidates"]].count("chosen") == 1
    markdown = (out / "search_report.md").read_text()
    assert all(c["name"] in markdown for c in report["candidates"])

    # Only the chosen adapter remains, at the output path.
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "README.md",  # PEFT's model card
        "adapter_config.json",
        "adapter_model.safetensors",
        "search_report.json",
        "search_report.md",
        "training_report.json",
    ], names
    assert len(list(out.rglob("adapter_model.safetensors"))) == 1
    trained = TrainingReport.read(out / "training_report.json")
    chosen = next(c for c in report["candidates"] if c["status"] == "chosen")
    assert trained.config["learning_rate"] == chosen["recipe"]["learning_rate"]
    assert trained.config["out"] == str(out)

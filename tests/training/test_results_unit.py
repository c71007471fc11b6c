"""The training table's own logic: recipe flags, the command lines of searched and fixed runs,
the validation split the search chooses on, and the goals computed from rows."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from training import results
from training.tasks import generate_all


def _args(**overrides) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    results.add_arguments(p)
    args = p.parse_args(["--work", "/tmp/unused"])
    args.tasks = ["intent", "format", "catalog"]
    args.search_tasks = ["intent", "format"]
    args.recipes = {}
    for k, v in overrides.items():
        setattr(args, k, v)
    return args


def test_parse_recipes() -> None:
    got = results.parse_recipes(["lora-catalog=lr:1e-3,steps:160", "full-catalog=lr:5e-5"])
    assert got == {"lora-catalog": {"lr": "1e-3", "steps": "160"}, "full-catalog": {"lr": "5e-5"}}
    for bad in ("lora-catalog", "=lr:1", "lora-x=speed:3", "lora-x=steps:abc", "lora-x=lr:-1"):
        with pytest.raises(SystemExit):
            results.parse_recipes([bad])


def test_searched_runs_choose_on_the_validation_split(tmp_path: Path) -> None:
    args = _args()
    cmd = results._train_cmd(args, tmp_path / "data", tmp_path, "lora", "intent", 64)
    assert "--search" in cmd
    assert cmd[cmd.index("--eval-data") + 1].endswith("intent/valid.jsonl")
    assert cmd[cmd.index("--search-lr") + 1] == args.lora_lrs
    assert cmd[cmd.index("--search-rank") + 1] == args.search_ranks
    full = results._train_cmd(args, tmp_path / "data", tmp_path, "full", "format", 64)
    assert full[full.index("--search-lr") + 1] == args.full_lrs and "--search-rank" not in full


def test_fixed_recipe_overrides_steps_and_rate(tmp_path: Path) -> None:
    args = _args(recipes=results.parse_recipes(["lora-catalog=lr:1e-3,steps:160,rank:16"]))
    cmd = results._train_cmd(args, tmp_path / "data", tmp_path, "lora", "catalog", 64)
    assert "--search" not in cmd
    assert cmd[cmd.index("--max-steps") + 1] == "160"
    assert cmd[cmd.index("--lr") + 1] == "1e-3"
    assert cmd[cmd.index("--rank") + 1] == "16" and cmd[cmd.index("--alpha") + 1] == "32"
    assert cmd[cmd.index("--eval-data") + 1].endswith("catalog/eval.jsonl")


def test_validation_split_shares_no_prompt(tmp_path: Path) -> None:
    generate_all(tmp_path, n_train=200, n_eval=30, tasks=("intent", "format"))
    results.write_validation_split(tmp_path, ["intent", "format", "catalog"], 30)
    assert not (tmp_path / "catalog" / "valid.jsonl").exists()

    def prompts(task: str, split: str) -> set[str]:
        lines = (tmp_path / task / f"{split}.jsonl").read_text().splitlines()
        return {json.loads(line)["messages"][0]["content"] for line in lines}

    for task in ("intent", "format"):
        valid = prompts(task, "valid")
        assert len(valid) == 30
        assert not valid & prompts(task, "train") and not valid & prompts(task, "eval")


def _row(method: str, task: str, score: float, forgetting: float, mc: float, share=0.0178):
    return {
        "method": method,
        "task": task,
        "score": score,
        "forgetting": forgetting,
        "mc_forgetting": mc,
        "trainable_share": share if method == "lora" else 1.0,
    }


def test_goals_from_rows() -> None:
    rows = [
        _row("lora", "intent", 0.96, 0.0, 0.02),
        _row("full", "intent", 0.98, 0.059, 0.00),
        _row("lora", "format", 0.80, 0.10, 0.0),
        _row("full", "format", 0.88, 0.05, 0.04),
        _row("lora", "catalog", 0.40, 0.0, 0.0),
        _row("full", "catalog", 0.625, 0.0, 0.0),
    ]
    goals = results.analyse(rows, ["intent", "format"], "catalog")["goals"]
    assert goals["lora_vs_full_score_intent"]["met"] is True  # 2 points short
    assert goals["lora_vs_full_score_format"]["met"] is False  # 8 points short
    assert goals["lora_vs_full_score_format"]["value"] == pytest.approx(-8.0)
    assert goals["lora_trainable_share_intent"]["met"] is True
    assert goals["lora_vs_full_forgetting_general_intent"]["met"] is True
    assert goals["lora_vs_full_forgetting_general_format"]["met"] is False
    assert goals["lora_vs_full_forgetting_harness_mc_intent"]["met"] is False
    assert goals["knowledge_best_score_catalog"] == {
        "value": 62.5,
        "goal": ">= 50 (%) for at least one method",
        "met": True,
    }
    assert goals["knowledge_lora_vs_full_catalog"]["value"] == pytest.approx(-22.5)
    assert goals["knowledge_lora_vs_full_catalog"]["met"] is None


def test_runs_start_in_the_given_order(tmp_path: Path) -> None:
    args = _args(order="full-format,lora-intent,catalog", qlora_steps=0)
    names = [f"{m}-{t}" for m, t, _ in results.train_jobs(args, tmp_path, tmp_path)]
    assert names[:2] == ["full-format", "lora-intent"]
    assert set(names[2:4]) == {"lora-catalog", "full-catalog"}
    assert len(names) == 6

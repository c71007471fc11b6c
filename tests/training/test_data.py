"""Data loading and validation, the task generator and its scorers (no model needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.data import DataError, load_jsonl
from training.tasks import GENERAL, TASK_NAMES, generate, generate_all, get_task


def test_bad_records_are_reported_with_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    lines = [
        json.dumps(good),
        "{not json",
        json.dumps({"messages": [{"role": "user", "content": "no answer"}]}),
        "",
        json.dumps({"prompt": "p", "completion": ""}),
        json.dumps(
            {"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}
        ),
        json.dumps([1, 2]),
        json.dumps({"prompt": "p", "completion": "c"}),
        json.dumps({"text": "neither form"}),
    ]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as info:
        load_jsonl(path)
    problems = info.value.problems
    assert [p.split(": ")[0] for p in problems] == [f"{path}:{n}" for n in (2, 3, 5, 6, 7, 9)]
    assert "invalid JSON" in problems[0]
    assert "last message must be the assistant" in problems[1]
    assert '"completion" must be a non-empty string' in problems[2]
    assert "role must be one of" in problems[3]
    assert "expected a JSON object" in problems[4]
    assert "neither" in problems[5]
    assert str(path) in str(info.value)


def test_not_utf8_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"prompt": "caf\xe9", "completion": "x"}\n')
    with pytest.raises(DataError, match=r"latin1\.jsonl:1: not UTF-8"):
        load_jsonl(path)
    with pytest.raises(DataError, match="file not found"):
        load_jsonl(tmp_path / "nope.jsonl")


def test_cli_data_check_names_file_and_line(tmp_path: Path, capsys) -> None:
    from serving.cli import main

    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": 3, "completion": "b"}\n')
    assert main(["data", "check", str(path)]) == 1
    assert f'{path}:2: "prompt" must be a non-empty string' in capsys.readouterr().err


def test_prompt_completion_and_messages_normalise_the_same(tmp_path: Path) -> None:
    path = tmp_path / "mixed.jsonl"
    path.write_text(
        json.dumps({"prompt": "Q", "completion": "A", "task": "intent"})
        + "\n"
        + json.dumps(
            {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}
        )
        + "\n"
    )
    first, second = load_jsonl(path)
    assert first.to_trl() == second.to_trl()
    assert first.task == "intent" and first.source == f"{path}:1"


def test_generator_is_deterministic_and_held_out_is_disjoint(tmp_path: Path) -> None:
    paths = generate_all(tmp_path / "a", n_train=50, n_eval=10)
    again = generate_all(tmp_path / "b", n_train=50, n_eval=10)
    for task in TASK_NAMES:
        for split in ("train", "eval"):
            assert paths[task][split].read_bytes() == again[task][split].read_bytes()
        train = {e.prompt[-1]["content"] for e in load_jsonl(paths[task]["train"])}
        held_out = [e.prompt[-1]["content"] for e in load_jsonl(paths[task]["eval"])]
        assert not train & set(held_out), task
        assert len(held_out) == len(set(held_out)) == 10
    assert generate("intent", "train", 20, seed=1) != generate("intent", "train", 20, seed=0)


@pytest.mark.parametrize("task", TASK_NAMES)
def test_scorers_accept_the_reference_and_reject_a_wrong_answer(task: str) -> None:
    spec = get_task(task)
    for record in generate(task, "eval", 10):
        reference = record["messages"][-1]["content"]
        assert spec.score(reference, reference) == 1.0
        assert spec.score("I am not sure, sorry.", reference) == 0.0


def test_scorer_details() -> None:
    extract = get_task("extract").score
    ref = json.dumps({"name": "A B", "email": "a@b.c", "city": "X", "order_id": 12345})
    assert extract('{"name": "A B", "email": "a@b.c", "city": "Y", "order_id": 12345}', ref) == 0.75
    assert extract('{"name": "A B", "email": "a@b.c", "city": "X"}', ref) == 0.0  # missing key
    assert get_task("intent").score(" Billing.\n", "billing") == 1.0
    assert (
        get_task("format").score(
            "SMITH, John | 2024-03-05 | 12.50 EUR", "SMITH, John | 2024-03-05 | 12.50 EUR"
        )
        == 1.0
    )
    assert (
        get_task("format").score(
            "Smith, John | 2024-03-05 | 12.50 EUR", "SMITH, John | 2024-03-05 | 12.50 EUR"
        )
        == 0.0
    )
    assert (
        get_task("catalog").score("It costs 129 euros.", "The Zorvex K3 drone costs 129 euros.")
        == 1.0
    )
    assert (
        get_task("catalog").score("It costs 1290 euros.", "The Zorvex K3 drone costs 129 euros.")
        == 0.0
    )
    assert GENERAL.score("The capital is Paris.", "paris") == 1.0

"""JSONL training data: loading, validation, conversion to TRL's prompt/completion form.

A line is one JSON object, either
- chat: `{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}` ending with an
  assistant turn (the target), with at least one user turn before it; or
- plain: `{"prompt": str, "completion": str}` (the prompt is sent as one user turn).
An optional `"task"` names the scoring program for evaluation. Every bad record is reported with
its file and line number, all of them at once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

ROLES = {"system", "user", "assistant"}


class DataError(ValueError):
    """One or more records are invalid; `problems` holds one `file:line: reason` per record."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        shown = problems[:50]
        more = f"\n... and {len(problems) - 50} more" if len(problems) > 50 else ""
        super().__init__(f"{len(problems)} invalid record(s):\n" + "\n".join(shown) + more)


@dataclass(frozen=True)
class Example:
    """A validated record: the conversation up to the target, and the target text."""

    prompt: list[dict[str, str]]
    completion: str
    task: str | None
    source: str  # "file:line"

    def to_trl(self) -> dict:
        """Conversational prompt/completion record, the form TRL's SFTTrainer trains on with
        the loss on the completion only."""
        return {
            "prompt": self.prompt,
            "completion": [{"role": "assistant", "content": self.completion}],
        }


def _check_messages(messages: object) -> str | None:
    if not isinstance(messages, list) or not messages:
        return '"messages" must be a non-empty list'
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            return f"messages[{i}] is not an object"
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            return f"messages[{i}].role must be one of {sorted(ROLES)}, got {role!r}"
        if not isinstance(content, str):
            return f"messages[{i}].content must be a string"
        if role != "system" and not content.strip():
            return f"messages[{i}].content is empty"
        extra = set(message) - {"role", "content"}
        if extra:
            return f"messages[{i}] has unknown keys {sorted(extra)}"
    if messages[-1]["role"] != "assistant":
        return "the last message must be the assistant's answer"
    if not any(m["role"] == "user" for m in messages[:-1]):
        return "there is no user message before the answer"
    return None


def parse_record(obj: object) -> tuple[Example | None, str | None]:
    """Validate one decoded JSON value; return the example or the reason it is invalid."""
    if not isinstance(obj, dict):
        return None, f"expected a JSON object, got {type(obj).__name__}"
    task = obj.get("task")
    if task is not None and not isinstance(task, str):
        return None, '"task" must be a string'
    if "messages" in obj:
        if "prompt" in obj or "completion" in obj:
            return None, 'use either "messages" or "prompt"/"completion", not both'
        problem = _check_messages(obj["messages"])
        if problem:
            return None, problem
        messages = [{"role": m["role"], "content": m["content"]} for m in obj["messages"]]
        return Example(messages[:-1], messages[-1]["content"], task, ""), None
    if "prompt" in obj or "completion" in obj:
        prompt, completion = obj.get("prompt"), obj.get("completion")
        if not isinstance(prompt, str) or not prompt.strip():
            return None, '"prompt" must be a non-empty string'
        if not isinstance(completion, str) or not completion.strip():
            return None, '"completion" must be a non-empty string'
        return Example([{"role": "user", "content": prompt}], completion, task, ""), None
    return None, 'record has neither "messages" nor "prompt"/"completion"'


def load_jsonl(path: str | Path) -> list[Example]:
    """Load and validate a JSONL file; raise DataError naming the file and line of every bad
    record (blank lines are skipped)."""
    path = Path(path)
    if not path.is_file():
        raise DataError([f"{path}: file not found"])
    examples: list[Example] = []
    problems: list[str] = []
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                problems.append(f"{where}: not UTF-8 ({exc.reason} at byte {exc.start})")
                continue
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                problems.append(f"{where}: invalid JSON: {exc.msg} (column {exc.colno})")
                continue
            example, problem = parse_record(obj)
            if problem:
                problems.append(f"{where}: {problem}")
                continue
            assert example is not None
            examples.append(Example(example.prompt, example.completion, example.task, where))
    if problems:
        raise DataError(problems)
    if not examples:
        raise DataError([f"{path}: no records"])
    return examples

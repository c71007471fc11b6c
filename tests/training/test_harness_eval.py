"""`tenantlora eval --harness`: lm-eval-harness (`local-completions`, loglikelihood and
generation) against the session's live server (tests/conftest.py `live_server`, real vLLM engine)
over HTTP, on a handful of items, with its public adapter `a` and a tenant key."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from support import tie_logprob_gap

from serving.hardware import resolve_dtype
from training.data import load_jsonl
from training.harness_eval import HarnessError, HarnessPlan, HarnessResult, run, write_report
from training.tasks import generate, get_task, write_jsonl

LIMIT = 4
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def harness_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("harness-data")
    write_jsonl(root / "intent" / "eval.jsonl", generate("intent", "eval", LIMIT, seed=0))
    return root


@pytest.fixture(scope="module")
def harness_run(
    live_server, tenant_key, base_model_path, harness_data, tmp_path_factory
) -> tuple[HarnessPlan, HarnessResult]:
    plan = HarnessPlan(
        server=live_server.url,
        model="a",
        tokenizer=base_model_path,
        out=tmp_path_factory.mktemp("harness-out"),
        tasks=["intent", "general_mc"],
        data_dir=harness_data,
        limit=LIMIT,
        api_key=tenant_key,
    )
    result = run(plan)
    write_report(result, plan.out)
    return plan, result


def _row(result: HarnessResult, task: str, metric: str):
    return next(r for r in result.rows if r.task == task and r.metric == metric)


@pytest.mark.engine
def test_multiple_choice_scored_by_loglikelihood(harness_run) -> None:
    _, result = harness_run
    row = _row(result, "tl_general_mc", "acc")
    assert 0.0 <= row.value <= 1.0 and row.n == LIMIT
    samples = result.samples["tl_general_mc"]
    assert len(samples) == LIMIT
    for s in samples:
        lls = s["loglikelihoods"]
        assert len(lls) == 4 and all(math.isfinite(x) and x < 0 for x in lls), lls
        assert len(set(lls)) > 1  # the server scored each choice, not one shared number
    # lm-eval's acc is the share of questions whose most likely choice is the answer
    hits = [s["choices"][max(range(4), key=s["loglikelihoods"].__getitem__)] == s["answer"]
            for s in samples]  # fmt: skip
    want = sum(hits) / LIMIT
    assert row.value == pytest.approx(want)


def _assert_same_greedy_text(harness_text: str, choice) -> None:
    """The harness's text is the chat route's greedy answer, except where the two part at a
    near-tie. The harness sends its prompts together, the test one at a time, and the compiled
    model's bf16 sums differ between batch sizes in the last bit, which can flip an argmax
    between two tokens whose log-probabilities agree within that noise (as in
    tests/cpu_lora/test_e2e.py). Allowed only after the first token, at a tie (tie_logprob_gap:
    0.125 in bf16, 1e-3 in float32)."""
    reply = choice.message.content
    if harness_text == reply:
        return
    text = ""
    for i, token in enumerate(choice.logprobs.content):
        if not harness_text.startswith(text + token.token):
            top = sorted((t.logprob for t in token.top_logprobs), reverse=True)
            gap = top[0] - top[1] if len(top) > 1 else float("inf")
            print(f"harness and chat route part at token {i}, log-prob gap {gap:.4f}")
            tie = tie_logprob_gap(resolve_dtype("auto", gpu=False))
            assert i > 0 and gap <= tie, f"{harness_text!r} vs {reply!r} (gap {gap})"
            return
        text += token.token
    raise AssertionError(f"{harness_text!r} vs {reply!r}")


@pytest.mark.engine
def test_generation_task_scores_what_the_chat_route_answers(
    harness_run, live_server, tenant_key, harness_data
) -> None:
    """The harness's greedy completions of the chat-rendered prompts are the chat route's own
    greedy answers (up to a near-tie, see _assert_same_greedy_text), and its `score` is the
    project's rule on them."""
    _, result = harness_run
    row = _row(result, "tl_intent", "score")
    assert 0.0 <= row.value <= 1.0 and row.n == LIMIT
    examples = load_jsonl(harness_data / "intent" / "eval.jsonl")
    client = live_server.client(tenant_key)
    scorer = get_task("intent")
    for example, sample in zip(examples, result.samples["tl_intent"], strict=True):
        reply = client.chat.completions.create(
            model="a", messages=example.prompt, temperature=0, max_tokens=scorer.max_tokens,
            logprobs=True, top_logprobs=2,
        )  # fmt: skip
        _assert_same_greedy_text(sample["output"], reply.choices[0])
        assert sample["score"] == scorer.score(sample["output"], example.completion)
    assert row.value == pytest.approx(sum(s["score"] for s in result.samples["tl_intent"]) / LIMIT)


@pytest.mark.engine
def test_report_files(harness_run) -> None:
    plan, result = harness_run
    report = json.loads((plan.out / "harness.json").read_text())
    assert report["model"] == "a" and len(report["rows"]) == len(result.rows)
    table = (plan.out / "harness.md").read_text()
    assert "| task | metric | value | stderr | n |" in table
    assert "| tl_general_mc | acc |" in table and "| tl_intent | score |" in table
    assert "lm_eval --model local-completions" in report["command"]


@pytest.mark.engine
def test_model_the_tenant_cannot_see_fails_clearly(
    live_server, tenant_key, adapter_dirs, base_model_path, tmp_path
) -> None:
    live_server.create_tenant("harness-owner")
    private = live_server.register_adapter("harness-private", adapter_dirs["c"], "harness-owner")
    plan = HarnessPlan(
        server=live_server.url,
        model=private,
        tokenizer=base_model_path,
        out=tmp_path / "api",
        tasks=["general_mc"],
        limit=1,
        api_key=tenant_key,
    )
    with pytest.raises(HarnessError, match=r"harness-private.*HTTP 404") as caught:
        run(plan)
    assert "harness-private" not in caught.value.args[0].split("models this key sees:")[1]
    # the command line says so in one line and exits 2, no traceback
    cli = subprocess.run(
        [
            sys.executable, "-m", "serving.cli", "eval", "--harness",
            "--server", live_server.url, "--model", private, "--api-key", tenant_key,
            "--tokenizer", str(base_model_path), "--tasks", "general_mc", "--limit", "1",
            "--out", str(tmp_path / "cli"),
        ],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip
    assert cli.returncode == 2, cli.stderr[-2000:]
    assert "error: the server refused model 'harness-private': HTTP 404" in cli.stderr
    assert "Traceback" not in cli.stderr
    assert httpx.get(f"{live_server.url}/health", timeout=10).status_code == 200

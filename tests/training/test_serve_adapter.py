"""A trained adapter registers on the running server (real vLLM engine) and changes the greedy
output. `live_server` is the session-wide server fixture from tests/conftest.py."""

from __future__ import annotations

import pytest

from training.data import load_jsonl
from training.tasks import INTENT_LABELS


@pytest.mark.engine
def test_trained_adapter_serves_and_changes_greedy_output(
    live_server, lora_run, intent_data
) -> None:
    adapter, _ = lora_run
    key = live_server.create_tenant("trainer")
    name = live_server.register_adapter("intent-test", adapter, tenant="trainer")
    client = live_server.client(key)
    _, eval_path = intent_data
    examples = load_jsonl(eval_path)[:3]

    def answer(model: str, messages) -> str:
        reply = client.chat.completions.create(
            model=model, messages=messages, temperature=0, max_tokens=16
        )
        return reply.choices[0].message.content or ""

    base = [answer(live_server.base_model_name, e.prompt) for e in examples]
    tuned = [answer(name, e.prompt) for e in examples]
    assert base != tuned
    # 8 steps teach the answer format (a bare label from the fixed set), not yet the task:
    # every tuned answer is one of the labels, which the base's free-text answers are not.
    assert all(t.strip() in INTENT_LABELS for t in tuned), tuned
    assert not all(b.strip() in INTENT_LABELS for b in base), base

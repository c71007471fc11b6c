"""vLLM's error messages name `vllm serve` flags; tenantlora's answers name its own settings or
say plainly what the server does not offer (serving/vllm_compat/messages.py). Also the chat
options (parsers, template) built from the settings."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import vllm

from serving.settings import Settings
from serving.vllm_compat.messages import rewrite_message
from serving.vllm_compat.serving import ChatOptions

VLLM = Path(vllm.__file__).parent
FLAG = re.compile(r"--[a-z][a-z0-9-]+")

# (vLLM source file, the message as vLLM 0.32 sends it, what the rewrite must say)
MESSAGES = [
    (
        "renderers/online_renderer.py",
        '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set',
        "TENANTLORA_TOOL_CALL_PARSER",
    ),
    (
        "renderers/online_renderer.py",
        'tool_choice="required" requires --tool-call-parser to be set',
        "TENANTLORA_TOOL_CALL_PARSER",
    ),
    (
        "renderers/online_renderer.py",
        'tool_choice=function "get_weather" requires --tool-call-parser to be set',
        'function "get_weather"',
    ),
    (
        "renderers/online_renderer.py",
        "Chat template is passed with request, but --trust-request-chat-template is not set. "
        "Refused request with untrusted chat template.",
        "does not accept a chat template",
    ),
    (
        "renderers/base.py",
        "You must set `--enable-prompt-embeds` to input `prompt_embeds`.",
        "does not accept `prompt_embeds`",
    ),
    (
        "renderers/chat_utils.py",
        "You must set `--enable-mm-embeds` to input `image_embeds`",
        "does not accept `image_embeds`",
    ),
    (
        "entrypoints/generate/base/protocol.py",
        "Per-request mm_processor_kwargs are disabled by default because they can change "
        "multimodal preprocessing resource usage. Start the server with "
        "--trust-request-mm-kwargs only when clients are trusted.",
        "does not accept `mm_processor_kwargs`",
    ),
    (
        "v1/engine/input_processor.py",
        "thinking_token_budget is set but reasoning_config is not configured. Please set "
        "--reasoning-parser and/or --reasoning-config to use thinking_token_budget.",
        "needs a reasoning parser",
    ),
    (
        "sampling_params.py",
        "Requested 30 token ids per row in prompt_logprob_token_ids, which is greater than max "
        "allowed: 20. Set max_logprobs (--max-logprobs) to at least 30.",
        "max allowed: 20.",
    ),
]


@pytest.mark.parametrize(("source", "message", "says"), MESSAGES)
def test_vllm_flag_messages_are_told_in_tenantlora_terms(source, message, says) -> None:
    # The flag still appears in vLLM's source (so the pattern follows the installed vLLM).
    flag = FLAG.search(message)[0]
    assert flag in (VLLM / source).read_text(), f"{flag} no longer in vllm/{source}"
    rewritten = rewrite_message(message)
    assert says in rewritten
    assert not FLAG.search(rewritten), rewritten


def test_tenantlora_flags_stay_and_unknown_flags_go() -> None:
    message = "Raise --max-model-len, or set `--some-vllm-flag 3` and --other-flag."
    assert rewrite_message(message) == (
        "Raise --max-model-len, or set an option this server does not offer and an option this "
        "server does not offer."
    )
    assert rewrite_message("plain message with a-b--c dashes") == (
        "plain message with a-b--c dashes"
    )


def test_chat_options_from_settings(tmp_path: Path) -> None:
    template = tmp_path / "tools.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    options = ChatOptions.from_settings(
        Settings(data_dir=tmp_path, tool_call_parser="hermes", chat_template=str(template))
    )
    kwargs = options.renderer_kwargs()
    assert kwargs["enable_auto_tools"] is True  # auto tool choice follows the parser
    assert kwargs["tool_parser"] == "hermes"
    assert kwargs["chat_template"] == template.read_text()
    assert ChatOptions.from_settings(Settings(data_dir=tmp_path)).renderer_kwargs() == {
        **kwargs,
        "chat_template": None,
        "enable_auto_tools": False,
        "tool_parser": None,
    }


@pytest.mark.parametrize(
    ("field", "env"),
    [("tool_call_parser", "TENANTLORA_TOOL_CALL_PARSER"), ("reasoning_parser", "REASONING")],
)
def test_unknown_parser_names_the_setting(tmp_path: Path, field: str, env: str) -> None:
    with pytest.raises(ValueError, match=env) as refused:
        ChatOptions.from_settings(Settings(data_dir=tmp_path, **{field: "no-such-parser"}))
    assert "--" not in str(refused.value)

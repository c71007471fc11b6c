"""vLLM's user-facing error messages, told in tenantlora's terms.

vLLM's serving code tells a client which `vllm serve` flag to set (`--enable-auto-tool-choice`,
`--tool-call-parser`, `--trust-request-chat-template`, ...). tenantlora has no such flags: each
known message is rewritten to name tenantlora's own setting, or to say plainly that the server
does not offer the feature; any other `--flag` that is not a `tenantlora serve` flag is replaced
by a neutral phrase, so no error names an option the operator cannot set."""

from __future__ import annotations

import re
from functools import cache

TOOL_PARSER_ENV = "TENANTLORA_TOOL_CALL_PARSER"

# (pattern on vLLM's message, replacement); the first that matches wins. Patterns follow the
# messages of vLLM 0.32 (renderers/online_renderer.py, renderers/base.py, renderers/chat_utils.py,
# generate/base/protocol.py, sampling_params.py, v1/engine/input_processor.py).
_REWRITES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern, re.DOTALL), replacement)
    for pattern, replacement in (
        (
            r'^"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser.*',
            '`tool_choice` "auto" needs a tool-call parser, and this server has none: use '
            f'`tool_choice` "none", or ask the operator to set {TOOL_PARSER_ENV} (e.g. hermes).',
        ),
        (
            r"^tool_choice=(?P<choice>.+?) requires --tool-call-parser to be set.*",
            r"`tool_choice` \g<choice> needs a tool-call parser, and this server has none: use "
            f'`tool_choice` "none", or ask the operator to set {TOOL_PARSER_ENV} (e.g. hermes).',
        ),
        (
            r"^Chat template is passed with request, but --trust-request-chat-template.*",
            "This server does not accept a chat template in the request (a template is code the "
            "server would run); the server's own template applies.",
        ),
        (
            r"You must set `--enable-prompt-embeds` to input `prompt_embeds`",
            "This server does not accept `prompt_embeds`.",
        ),
        (
            r"You must set `--enable-mm-embeds` to input `(?P<field>\w+)`",
            r"This server does not accept `\g<field>`.",
        ),
        (
            r"^Per-request (?P<field>\w+) are disabled by default.*",
            r"This server does not accept `\g<field>` in requests.",
        ),
        (
            r"^thinking_token_budget is set but reasoning_config is not configured.*",
            "`thinking_token_budget` needs a reasoning parser, and this server's engine has none.",
        ),
        (r"\s*Set max_logprobs \(--max-logprobs\) to at least \d+\.", ""),
    )
)
# `--flag value` in backticks, or a bare --flag
_FLAG = re.compile(r"`--(?P<quoted>[a-z][a-z0-9-]*)[^`]*`|(?<![\w-])--(?P<bare>[a-z][a-z0-9-]*)")


@cache
def _tenantlora_flags() -> frozenset[str]:
    from serving.cli_serve import serve_flags

    return frozenset(
        flag.split()[0].replace("--[no-]", "--").removeprefix("--")
        for flag in serve_flags().values()
    )


def _neutral_flag(match: re.Match[str]) -> str:
    if (match["quoted"] or match["bare"]) in _tenantlora_flags():
        return match[0]
    return "an option this server does not offer"


def rewrite_message(message: str) -> str:
    """`message` with every mention of a vLLM flag tenantlora does not have rewritten."""
    for pattern, replacement in _REWRITES:
        rewritten, count = pattern.subn(replacement, message, count=1)
        if count:
            message = rewritten
            break
    return _FLAG.sub(_neutral_flag, message)

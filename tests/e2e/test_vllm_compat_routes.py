"""Clients written for `vllm serve`, against the real server: tool calling (with and without a
tool-call parser), the runtime adapter API (/v1/load_lora_adapter, /v1/unload_lora_adapter)
and /tokenize, /detokenize, each with tenantlora's tenant rules."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import openai
import pytest
from conftest import ServerProcess

REPO = Path(__file__).resolve().parents[2]
TOOLS_TEMPLATE = REPO / "serving" / "vllm_compat" / "templates" / "chatml_tools.jinja"
VLLM_FLAGS = re.compile(r"--(enable-auto-tool-choice|tool-call-parser|trust-request-chat-template)")
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris right now?"}]


@pytest.fixture(scope="module")
def tool_server(base_model_path, tmp_path_factory):
    """A second server with a tool-call parser (hermes) and the ChatML tools template, open to
    anonymous callers (no tenant key required)."""
    data_dir = tmp_path_factory.mktemp("tool-server")
    server = ServerProcess(
        data_dir,
        base_model_path,
        ["--max-model-len", "1024", "--max-num-seqs", "8", "--kv-cache-gib", "0.5"],
        data_dir / "server.log",
    )
    server.env = {
        "TENANTLORA_TOOL_CALL_PARSER": "hermes",
        "TENANTLORA_CHAT_TEMPLATE": str(TOOLS_TEMPLATE),
        "TENANTLORA_AUTH_REQUIRED": "false",
    }
    server.start()
    yield server
    server.stop()


def _post(
    server: ServerProcess, path: str, key: str | None, body: dict, **params
) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{server.url}{path}", json=body, headers=headers, params=params, timeout=120)


def _error(response: httpx.Response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code, error
    assert set(error) == {"message", "type", "param", "code"}
    return error["message"]


# ---- tool calling -------------------------------------------------------------------------------


@pytest.mark.parametrize("choice", ["auto", "required", "named"])
def test_tools_without_a_parser_name_tenantlora_setting(live_server, tenant_key, choice):
    client = live_server.client(tenant_key)
    tool_choice = (
        {"type": "function", "function": {"name": "get_weather"}} if choice == "named" else choice
    )
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model=live_server.base_model_name,
            messages=ASK,
            tools=[WEATHER],
            tool_choice=tool_choice,
            max_tokens=8,
        )
    message = refused.value.body["message"]
    assert "TENANTLORA_TOOL_CALL_PARSER" in message
    assert not VLLM_FLAGS.search(message) and "--" not in message, message
    # tool_choice "none" needs no parser
    plain = client.chat.completions.create(
        model="a", messages=ASK, tools=[WEATHER], tool_choice="none", max_tokens=8
    )
    assert plain.choices[0].message.content


def test_request_chat_template_refused_without_flag_names(live_server, tenant_key):
    body = {
        "model": live_server.base_model_name,
        "messages": ASK,
        "max_tokens": 4,
        "chat_template": "{{ messages[0]['content'] }}",
    }
    message = _error(
        _post(live_server, "/v1/chat/completions", tenant_key, body), 400, "bad_request"
    )
    assert "chat template" in message and "--" not in message


def test_auto_tool_choice_with_a_parser(tool_server):
    client = tool_server.client("anonymous")
    for model in (tool_server.base_model_name,):
        reply = client.chat.completions.create(
            model=model, messages=ASK, tools=[WEATHER], tool_choice="auto", max_tokens=64
        )
        message = reply.choices[0].message
        # SmolLM2-135M may or may not call the tool; a call it makes must be parsed.
        for call in message.tool_calls or []:
            assert call.function.name == "get_weather"
            assert isinstance(json.loads(call.function.arguments), dict)
        assert message.tool_calls or message.content
        assert reply.choices[0].finish_reason in ("stop", "length", "tool_calls")


@pytest.mark.parametrize("choice", ["required", "named"])
def test_forced_tool_choice_returns_a_parsed_call(tool_server, choice):
    tool_choice = (
        {"type": "function", "function": {"name": "get_weather"}} if choice == "named" else choice
    )
    reply = tool_server.client("anonymous").chat.completions.create(
        model=tool_server.base_model_name,
        messages=ASK,
        tools=[WEATHER],
        tool_choice=tool_choice,
        max_tokens=64,
        temperature=0,
    )
    calls = reply.choices[0].message.tool_calls
    assert calls and calls[0].function.name == "get_weather"
    assert "city" in json.loads(calls[0].function.arguments)


def test_chat_template_setting_renders_tools(tool_server, live_server, tenant_key):
    """The configured template shows the tools to the model; the model's own template does not."""
    body = {"model": None, "messages": ASK, "tools": [WEATHER]}
    ids = _post(tool_server, "/tokenize", None, body).json()["tokens"]
    text = _post(tool_server, "/detokenize", None, {"tokens": ids}).json()["prompt"]
    assert "<tools>" in text and "get_weather" in text
    own = _post(live_server, "/tokenize", tenant_key, body).json()["tokens"]
    assert (
        "get_weather"
        not in _post(live_server, "/detokenize", tenant_key, {"tokens": own}).json()["prompt"]
    )


# ---- /tokenize and /detokenize ------------------------------------------------------------------


def test_tokenize_and_detokenize_per_model(live_server, tenant_key):
    prompt = "The sea is wide."
    base = _post(
        live_server, "/tokenize", tenant_key, {"prompt": prompt, "return_token_strs": True}
    )
    assert base.status_code == 200, base.text
    info = base.json()
    assert info["count"] == len(info["tokens"]) > 0
    assert info["max_model_len"] == 1024
    assert "".join(info["token_strs"]).replace("Ġ", " ") == prompt
    # adapters share the base tokenizer
    with_adapter = _post(live_server, "/tokenize", tenant_key, {"model": "a", "prompt": prompt})
    assert with_adapter.json()["tokens"] == info["tokens"]
    back = _post(live_server, "/detokenize", tenant_key, {"model": "a", "tokens": info["tokens"]})
    assert back.status_code == 200 and back.json() == {"prompt": prompt}
    chat = _post(live_server, "/tokenize", tenant_key, {"model": "b", "messages": ASK}).json()
    text = _post(live_server, "/detokenize", tenant_key, {"tokens": chat["tokens"]}).json()
    assert text["prompt"].endswith("<|im_start|>assistant\n")  # the chat template, applied


def test_tokenize_unknown_or_foreign_model_is_the_same_404(live_server, adapter_dirs):
    owner = live_server.create_tenant("tok-owner")
    other = live_server.create_tenant("tok-other")
    live_server.register_adapter("tok-private", adapter_dirs["c"], tenant="tok-owner")
    assert _post(
        live_server, "/tokenize", owner, {"model": "tok-private", "prompt": "x"}
    ).is_success
    for path, body in (("/tokenize", {"prompt": "x"}), ("/detokenize", {"tokens": [1, 2]})):
        foreign = _post(live_server, path, other, {**body, "model": "tok-private"})
        unknown = _post(live_server, path, other, {**body, "model": "tok-nothing"})
        _error(foreign, 404, "model_not_found")
        assert foreign.json()["error"]["message"].replace("tok-private", "X") == unknown.json()[
            "error"
        ]["message"].replace("tok-nothing", "X")


def test_tokenize_auth_and_bad_bodies(live_server, tenant_key, tool_server):
    _error(_post(live_server, "/tokenize", None, {"prompt": "x"}), 401, "missing_api_key")
    _error(_post(live_server, "/tokenize", "wrong-key", {"prompt": "x"}), 401, "invalid_api_key")
    _error(_post(live_server, "/tokenize", tenant_key, {}), 400, "invalid_request")
    _error(_post(live_server, "/detokenize", tenant_key, {"tokens": [-1]}), 400, "invalid_request")
    _error(_post(live_server, "/detokenize", tenant_key, {"tokens": "12"}), 400, "invalid_request")
    # where the OpenAI routes are open to anonymous callers, so is tokenizing
    assert _post(tool_server, "/tokenize", None, {"prompt": "x"}).json()["count"] > 0
    assert live_server.client(tenant_key).models.list()  # still serving


# ---- /v1/load_lora_adapter and /v1/unload_lora_adapter ------------------------------------------


def test_load_and_unload_for_a_tenant(live_server, adapter_dirs):
    key = live_server.create_tenant("vllm-loader")
    other = live_server.create_tenant("vllm-bystander")
    admin = live_server.admin_key
    body = {"lora_name": "runtime", "lora_path": str(adapter_dirs["c"])}

    loaded = _post(live_server, "/v1/load_lora_adapter", admin, body, tenant="vllm-loader")
    assert loaded.status_code == 200, loaded.text
    assert loaded.text == "Success: LoRA adapter 'runtime' added successfully."
    chat = live_server.client(key).chat.completions.create(
        model="runtime", messages=ASK, max_tokens=4
    )
    assert chat.model == "runtime"
    with pytest.raises(openai.NotFoundError):
        live_server.client(other).chat.completions.create(
            model="runtime", messages=ASK, max_tokens=4
        )

    # vLLM's rule: a loaded name again only with load_inplace (here: a new version)
    again = _post(live_server, "/v1/load_lora_adapter", admin, body, tenant="vllm-loader")
    _error(again, 400, "adapter_exists")
    inplace = {**body, "lora_path": str(adapter_dirs["d"]), "load_inplace": True}
    assert _post(
        live_server, "/v1/load_lora_adapter", admin, inplace, tenant="vllm-loader"
    ).is_success
    versions = httpx.get(
        f"{live_server.base_url}/adapters/runtime", headers={"Authorization": f"Bearer {key}"}
    ).json()["versions"]
    assert sorted(v["version"] for v in versions) == [1, 2]

    # the tenant unloads its own adapter (every version), as DELETE /v1/adapters/runtime does
    gone = _post(live_server, "/v1/unload_lora_adapter", key, {"lora_name": "runtime"})
    assert gone.status_code == 200, gone.text
    assert gone.text == "Success: LoRA adapter 'runtime' removed successfully."
    with pytest.raises(openai.NotFoundError):
        live_server.client(key).chat.completions.create(model="runtime", messages=ASK, max_tokens=4)
    _error(
        _post(live_server, "/v1/unload_lora_adapter", key, {"lora_name": "runtime"}),
        404,
        "adapter_not_found",
    )


def test_admin_loads_for_everyone(live_server, tenant_key, adapter_dirs):
    admin = live_server.admin_key
    body = {"lora_name": "everyone", "lora_path": str(adapter_dirs["d"])}
    assert _post(live_server, "/v1/load_lora_adapter", admin, body).status_code == 200
    ids = [m.id for m in live_server.client(tenant_key).models.list().data]
    assert "everyone" in ids
    # a tenant cannot unload the server's adapter: to it, it is not its own
    _error(
        _post(live_server, "/v1/unload_lora_adapter", tenant_key, {"lora_name": "everyone"}),
        404,
        "adapter_not_found",
    )
    assert _post(
        live_server, "/v1/unload_lora_adapter", admin, {"lora_name": "everyone"}
    ).is_success
    assert "everyone" not in [m.id for m in live_server.client(tenant_key).models.list().data]


def test_load_refusals(live_server, tenant_key, adapter_dirs, tool_server):
    folder = str(adapter_dirs["c"])
    body = {"lora_name": "sneaky", "lora_path": folder}
    # a tenant may not name server paths, not even allowed ones
    message = _error(
        _post(live_server, "/v1/load_lora_adapter", tenant_key, body), 403, "admin_required"
    )
    assert "POST /v1/adapters" in message and folder not in message
    # the admin only under adapter_roots; the answer shows no path
    outside = {"lora_name": "sneaky", "lora_path": "/etc"}
    refused = _post(live_server, "/v1/load_lora_adapter", live_server.admin_key, outside)
    assert refused.status_code == 403 and "/etc" not in refused.text
    assert refused.json()["error"]["param"] == "lora_path"
    relative = {"lora_name": "sneaky", "lora_path": "adapters/c"}
    _error(
        _post(live_server, "/v1/load_lora_adapter", live_server.admin_key, relative),
        400,
        "invalid_path",
    )
    _error(
        _post(live_server, "/v1/load_lora_adapter", live_server.admin_key, {"lora_name": "x"}),
        400,
        "invalid_request",
    )
    # another tenant named by a tenant key: refused
    _error(
        _post(live_server, "/v1/load_lora_adapter", tenant_key, body, tenant="vllm-loader"),
        403,
        "admin_required",
    )
    # anonymous callers never load or unload, even where they may generate
    _error(_post(tool_server, "/v1/load_lora_adapter", None, body), 403, "tenant_key_required")
    _error(
        _post(tool_server, "/v1/unload_lora_adapter", None, {"lora_name": "a"}),
        403,
        "tenant_key_required",
    )

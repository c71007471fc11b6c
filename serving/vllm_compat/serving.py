"""vLLM's own OpenAI serving classes, with the adapter chosen by our tenant layer.

vLLM's classes look adapters up by `request.model` in one flat, global dict. The tenant layer
resolves the name per tenant before the call and hands the result over in the request's lease
(`serving.lease.current_lease`); these subclasses read it instead. Everything else (protocol
models, chat templates, sampling, streaming, usage) is vLLM's code, unchanged."""

from __future__ import annotations

from dataclasses import dataclass

from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat
from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion
from vllm.entrypoints.openai.models.protocol import BaseModelPath
from vllm.entrypoints.openai.models.serving import OpenAIServingModels
from vllm.entrypoints.serve.tokenize.serving import ServingTokenization
from vllm.lora.request import LoRARequest
from vllm.renderers.chat_utils import load_chat_template
from vllm.renderers.online_renderer import OnlineRenderer

from serving.lease import current_lease
from serving.settings import Settings


def _resolved():
    lease = current_lease.get()
    return lease.resolved if lease is not None else None


class TenantServingModels(OpenAIServingModels):
    def model_name(self, lora_request: LoRARequest | None = None) -> str:
        resolved = _resolved()  # the name the client asked for, never the engine-side name
        return resolved.public_name if resolved else self.base_model_paths[0].name


class _ResolvedAdapter:
    async def _check_model(self, request):  # the tenant layer already answered 404s
        return None

    def _maybe_get_adapters(self, request, supports_default_mm_loras: bool = False):
        resolved = _resolved()
        return resolved.lora_request() if resolved else None


class TenantServingChat(_ResolvedAdapter, OpenAIServingChat):
    pass


class TenantServingCompletion(_ResolvedAdapter, OpenAIServingCompletion):
    pass


class TenantServingTokenization(_ResolvedAdapter, ServingTokenization):
    pass


@dataclass(frozen=True)
class ChatOptions:
    """What vLLM's chat and tokenization classes need from tenantlora's settings."""

    tool_call_parser: str | None = None
    reasoning_parser: str | None = None
    chat_template: str | None = None  # the template text (loaded from a file if one was named)

    @classmethod
    def from_settings(cls, settings: Settings | None) -> ChatOptions:
        if settings is None:
            return cls()
        check_parser_names(settings.tool_call_parser, settings.reasoning_parser)
        template = settings.chat_template
        return cls(
            tool_call_parser=settings.tool_call_parser or None,
            reasoning_parser=settings.reasoning_parser or None,
            chat_template=load_chat_template(template) if template else None,
        )

    def renderer_kwargs(self) -> dict:
        """Keyword arguments shared by vLLM's OnlineRenderer and OpenAIServingChat. Auto tool
        choice is on exactly when a tool-call parser is set (vLLM's two flags in one setting)."""
        return dict(
            chat_template=self.chat_template,
            chat_template_content_format="auto",
            enable_auto_tools=self.tool_call_parser is not None,
            tool_parser=self.tool_call_parser,
            reasoning_parser=self.reasoning_parser or "",
        )


def check_parser_names(tool_call_parser: str | None, reasoning_parser: str | None) -> None:
    """Refuse an unknown parser at start-up, naming tenantlora's setting (vLLM's own message
    names its command-line flags)."""
    from vllm.reasoning import ReasoningParserManager
    from vllm.tool_parsers import ToolParserManager

    for value, setting, manager in (
        (tool_call_parser, "TENANTLORA_TOOL_CALL_PARSER", ToolParserManager),
        (reasoning_parser, "TENANTLORA_REASONING_PARSER", ReasoningParserManager),
    ):
        known = manager.list_registered()
        if value and value not in known:
            raise ValueError(f"{setting}={value!r} is not one of vLLM's: {', '.join(known)}")


def build_serving(engine, base_name: str, settings: Settings | None = None):
    """Create vLLM's renderer and serving objects around `engine` (an engine client), with the
    tool-call parser, reasoning parser and chat template from `settings`. The model path clients
    see is the served name: no server path reaches a response."""
    options = ChatOptions.from_settings(settings)
    models = TenantServingModels(
        engine_client=engine, base_model_paths=[BaseModelPath(name=base_name, model_path=base_name)]
    )
    renderer = OnlineRenderer(
        model_config=engine.model_config,
        renderer=engine.renderer,
        request_logger=None,
        **options.renderer_kwargs(),
    )
    renderer.warmup()
    chat = TenantServingChat(
        engine,
        models,
        "assistant",
        online_renderer=renderer,
        request_logger=None,
        **options.renderer_kwargs(),
    )
    completion = TenantServingCompletion(
        engine, models, online_renderer=renderer, request_logger=None
    )
    return models, chat, completion


def build_tokenization(chat: OpenAIServingChat) -> TenantServingTokenization:
    """vLLM's /tokenize and /detokenize serving object, sharing the chat route's renderer,
    models and template (adapters share the base tokenizer)."""
    return TenantServingTokenization(
        chat.models,
        chat.online_renderer,
        chat_template=chat.chat_template,
        chat_template_content_format=chat.chat_template_content_format,
        request_logger=None,
    )

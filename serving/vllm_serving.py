"""vLLM's own OpenAI serving classes, with the adapter chosen by our tenant layer.

vLLM's classes look adapters up by `request.model` in one flat, global dict. We resolve the name
per tenant before the call and hand the result over in a context variable; these subclasses read
it instead. Everything else (protocol models, chat templates, sampling, streaming, usage) is
vLLM's code, unchanged."""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass

from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat
from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion
from vllm.entrypoints.openai.models.protocol import BaseModelPath
from vllm.entrypoints.openai.models.serving import OpenAIServingModels
from vllm.lora.request import LoRARequest
from vllm.renderers.online_renderer import OnlineRenderer


@dataclass(frozen=True)
class ResolvedModel:
    """The model a request asked for, as its tenant sees it, and the adapter to run."""

    public_name: str
    lora: LoRARequest | None


current_model: ContextVar[ResolvedModel | None] = ContextVar("tenantlora_model", default=None)


class TenantServingModels(OpenAIServingModels):
    def model_name(self, lora_request: LoRARequest | None = None) -> str:
        resolved = current_model.get()
        return resolved.public_name if resolved else self.base_model_paths[0].name


class _ResolvedAdapter:
    async def _check_model(self, request):  # the tenant layer already answered 404s
        return None

    def _maybe_get_adapters(self, request, supports_default_mm_loras: bool = False):
        resolved = current_model.get()
        return resolved.lora if resolved else None


class TenantServingChat(_ResolvedAdapter, OpenAIServingChat):
    pass


class TenantServingCompletion(_ResolvedAdapter, OpenAIServingCompletion):
    pass


def build_serving(engine, base_name: str, base_path: str):
    """Create vLLM's renderer and serving objects around `engine` (an engine client)."""
    models = TenantServingModels(
        engine_client=engine, base_model_paths=[BaseModelPath(name=base_name, model_path=base_path)]
    )
    renderer = OnlineRenderer(
        model_config=engine.model_config,
        renderer=engine.renderer,
        request_logger=None,
        chat_template=None,
        chat_template_content_format="auto",
    )
    renderer.warmup()
    chat = TenantServingChat(
        engine,
        models,
        "assistant",
        online_renderer=renderer,
        request_logger=None,
        chat_template=None,
        chat_template_content_format="auto",
    )
    completion = TenantServingCompletion(
        engine, models, online_renderer=renderer, request_logger=None
    )
    return models, chat, completion

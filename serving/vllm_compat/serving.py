"""vLLM's own OpenAI serving classes, with the adapter chosen by our tenant layer.

vLLM's classes look adapters up by `request.model` in one flat, global dict. The tenant layer
resolves the name per tenant before the call and hands the result over in the request's lease
(`serving.lease.current_lease`); these subclasses read it instead. Everything else (protocol
models, chat templates, sampling, streaming, usage) is vLLM's code, unchanged."""

from __future__ import annotations

from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat
from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion
from vllm.entrypoints.openai.models.protocol import BaseModelPath
from vllm.entrypoints.openai.models.serving import OpenAIServingModels
from vllm.lora.request import LoRARequest
from vllm.renderers.online_renderer import OnlineRenderer

from serving.lease import current_lease


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


def build_serving(engine, base_name: str):
    """Create vLLM's renderer and serving objects around `engine` (an engine client). The model
    path clients see is the served name: no server path reaches a response."""
    models = TenantServingModels(
        engine_client=engine, base_model_paths=[BaseModelPath(name=base_name, model_path=base_name)]
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

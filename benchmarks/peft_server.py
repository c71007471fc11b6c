"""The peer a team would write by hand: transformers + PEFT behind a small OpenAI-compatible
FastAPI app. All adapters are loaded into one ``PeftModel``; each request takes a global lock,
calls ``set_adapter`` (or disables adapters for the base model) and decodes token by token with a
KV cache. One request at a time, so no batching at all, let alone across adapters.

    tenantlora bench peft-server --base-model DIR --lora a=PATH --lora b=PATH --port 8200
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import nullcontext
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from transformers import AutoModelForCausalLM, AutoTokenizer


class PeftEngine:
    """One base model with every adapter attached; generates one request at a time."""

    def __init__(self, base_model: str, loras: dict[str, str], dtype: str, served_name: str):
        from peft import PeftModel

        self.served_name = served_name
        self.tokenizer = AutoTokenizer.from_pretrained(base_model)
        model = AutoModelForCausalLM.from_pretrained(base_model, dtype=getattr(torch, dtype))
        self.adapters = list(loras)
        if loras:
            first, *rest = loras.items()
            model = PeftModel.from_pretrained(model, first[1], adapter_name=first[0])
            for name, path in rest:
                model.load_adapter(path, adapter_name=name)
        self.model = model.eval()
        self.lock = threading.Lock()

    def models(self) -> list[str]:
        return [self.served_name, *self.adapters]

    def _select(self, model: str):
        """Activate the adapter for ``model``; returns a context for the forward passes."""
        if model in self.adapters:
            self.model.set_adapter(model)
            return nullcontext()
        if self.adapters:
            return self.model.disable_adapter()
        return nullcontext()

    def generate(
        self,
        model: str,
        prompt_ids: list[int],
        max_tokens: int,
        temperature: float,
        ignore_eos: bool,
    ) -> Iterator[int]:
        """Yield generated token ids (greedy when temperature is 0)."""
        eos = self.tokenizer.eos_token_id
        with self.lock, torch.inference_mode(), self._select(model):
            ids = torch.tensor([prompt_ids])
            out = self.model(input_ids=ids, use_cache=True)
            for _ in range(max_tokens):
                logits = out.logits[:, -1, :].float()
                if temperature > 0:
                    probs = torch.softmax(logits / temperature, dim=-1)
                    token = torch.multinomial(probs, 1)
                else:
                    token = logits.argmax(dim=-1, keepdim=True)
                tid = int(token)
                yield tid
                if tid == eos and not ignore_eos:
                    return
                out = self.model(
                    input_ids=token, past_key_values=out.past_key_values, use_cache=True
                )


def _error(status: int, message: str, code: str) -> JSONResponse:
    return JSONResponse(
        {"error": {"message": message, "type": "invalid_request_error", "code": code}},
        status_code=status,
    )


def build_app(engine: PeftEngine) -> FastAPI:
    """The OpenAI-compatible routes around ``engine``."""
    app = FastAPI(title="transformers+PEFT peer")

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": m, "object": "model", "owned_by": "peft"} for m in engine.models()],
        }

    async def _generate(request: Request, chat: bool) -> Any:
        body = await request.json()
        model = body.get("model")
        if model not in engine.models():
            return _error(404, f"model {model!r} not found", "model_not_found")
        tok = engine.tokenizer
        if chat:
            messages = body.get("messages") or []
            prompt_ids = tok.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True
            )
            if isinstance(prompt_ids, dict) or hasattr(prompt_ids, "input_ids"):
                prompt_ids = prompt_ids["input_ids"]
        else:
            prompt_ids = tok(body.get("prompt", ""))["input_ids"]
        max_tokens = int(body.get("max_tokens") or 16)
        temperature = float(body.get("temperature") or 0.0)
        ignore_eos = bool(body.get("ignore_eos", False))
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:16]}"
        created = int(time.time())
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[int | None | BaseException] = asyncio.Queue()

        def worker() -> None:
            try:
                for tid in engine.generate(
                    model, list(prompt_ids), max_tokens, temperature, ignore_eos
                ):
                    loop.call_soon_threadsafe(queue.put_nowait, tid)
            except BaseException as exc:  # surfaced to the client as a stream error
                loop.call_soon_threadsafe(queue.put_nowait, exc)
            loop.call_soon_threadsafe(queue.put_nowait, None)

        threading.Thread(target=worker, daemon=True).start()

        def chunk(text: str | None, finish: str | None) -> dict[str, Any]:
            if chat:
                delta = {"content": text} if text is not None else {}
                choice = {"index": 0, "delta": delta, "finish_reason": finish}
                obj = "chat.completion.chunk"
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": finish}
                obj = "text_completion"
            return {
                "id": rid,
                "object": obj,
                "created": created,
                "model": model,
                "choices": [choice],
            }

        async def tokens() -> AsyncIterator[int]:
            while True:
                item = await queue.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item

        usage = lambda n: {  # noqa: E731
            "prompt_tokens": len(prompt_ids),
            "completion_tokens": n,
            "total_tokens": len(prompt_ids) + n,
        }

        if body.get("stream"):

            async def sse() -> AsyncIterator[str]:
                n = 0
                try:
                    async for tid in tokens():
                        n += 1
                        yield f"data: {json.dumps(chunk(tok.decode([tid]), None))}\n\n"
                except Exception as exc:  # noqa: BLE001
                    yield f"data: {json.dumps({'error': {'message': str(exc), 'type': 'server_error', 'code': 500}})}\n\n"
                    return
                finish = "length" if n >= max_tokens else "stop"
                yield f"data: {json.dumps(chunk(None if chat else '', finish))}\n\n"
                if (body.get("stream_options") or {}).get("include_usage"):
                    last = {**chunk(None, None), "choices": [], "usage": usage(n)}
                    yield f"data: {json.dumps(last)}\n\n"
                yield "data: [DONE]\n\n"

            return StreamingResponse(sse(), media_type="text/event-stream")

        ids = [tid async for tid in tokens()]
        text = tok.decode(ids)
        finish = "length" if len(ids) >= max_tokens else "stop"
        if chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish,
            }
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish}
            obj = "text_completion"
        return {
            "id": rid,
            "object": obj,
            "created": created,
            "model": model,
            "choices": [choice],
            "usage": usage(len(ids)),
        }

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await _generate(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await _generate(request, chat=True)

    return app


def serve(args: argparse.Namespace) -> int:
    """Run the peer with the flags of `tenantlora bench peft-server` (benchmarks/cli.py)."""
    torch.set_num_threads(args.threads)
    loras = dict(item.split("=", 1) for item in args.lora)
    engine = PeftEngine(args.base_model, loras, args.dtype, args.served_model_name)
    uvicorn.run(build_app(engine), host=args.host, port=args.port, log_level="warning")
    return 0

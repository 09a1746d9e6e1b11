"""A vLLM-compatible OpenAI server that generates deterministic text without a model.

Used for development, tests and benchmarks: answers in vLLM's wire format (chat, completions, embeddings, the
Responses API without stored responses, model list, runtime LoRA adapters, /metrics with vLLM's metric names), with
configurable timing and injected faults.
Settings can be changed while it runs: ``POST /sim/control`` with a JSON object of SimSettings fields.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections import deque
from pathlib import Path
from typing import Any

import orjson

from gateway.asgi import DisconnectGuard, ClientDisconnected, Receive, Scope, Send, header, read_body, send_response
from gateway.asgi import end_stream, send_chunk, start_stream
from gateway.sim import adapters, generate, guard, protocols, schema_json
from gateway.sim.tools import forced_tool, text_of
from gateway.sim.lora import LoraError, LoraSlots
from gateway.sim.settings import SimSettings

MAX_BODY = 64 * 1024 * 1024


def _chat_prompt_tokens(messages: list) -> int:
    return sum(generate.count_tokens(text_of(m.get("content"))) + 4 for m in messages if isinstance(m, dict)) + 2


class SimError(Exception):
    def __init__(self, status: int, message: str, type: str = "BadRequestError", param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type, param

    def body(self) -> bytes:
        return orjson.dumps(
            {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.status}}
        )


class Stats:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.requests = 0
        self.completed = 0
        self.cancelled = 0
        self.errors_injected = 0
        self.hangs_injected = 0
        self.streams_broken = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0


class Simulator:
    def __init__(self, settings: SimSettings | None = None) -> None:
        self.settings = settings or SimSettings()
        self.stats = Stats()
        self.lora = LoraSlots(self.settings.max_loras, self.settings.lora_swap_ms / 1000)
        self.recorded: deque[dict] = deque(maxlen=self.settings.record_requests)
        self.running = 0
        self.waiting = 0
        self.kv_tokens_in_use = 0
        self._slots = asyncio.Semaphore(self.settings.max_num_seqs)
        self._random = random.Random(0)
        self._created = int(time.time())
        self._routes = {
            ("POST", "/v1/chat/completions"): self._chat,
            ("POST", "/v1/completions"): self._completions,
            ("POST", "/v1/embeddings"): self._embeddings,
            ("POST", "/v1/responses"): self._responses,
            ("POST", "/v1/moderations"): self._moderations,
            ("GET", "/v1/models"): self._models,
            ("POST", "/v1/load_lora_adapter"): self._load_lora,
            ("POST", "/v1/unload_lora_adapter"): self._unload_lora,
            ("GET", "/health"): self._health,
            ("GET", "/version"): self._version,
            ("GET", "/metrics"): self._metrics,
            ("GET", "/sim/control"): self._control,
            ("POST", "/sim/control"): self._control,
            ("GET", "/sim/stats"): self._stats,
            ("GET", "/sim/requests"): self._requests,
            ("POST", "/sim/reset"): self._reset,
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                await _lifespan(receive, send)
            return
        path = scope["path"]
        handler, style = self._routes.get((scope["method"], path)), "openai"
        if handler is None and scope["method"] == "POST":
            handler, style = self._provider_route(path)
        if handler is None:
            status = 405 if any(known == path for _, known in self._routes) else 404
            error = SimError(status, f"{scope['method']} {path} is not served here", "NotFoundError")
            await send_response(send, status, error.body())
            return
        if self.settings.api_key and (path.startswith("/v1") or style != "openai") and not self._authorized(
                scope, style):
            await self._send_error(send, style, SimError(401, "Unauthorized", "AuthenticationError"))
            return
        try:
            await handler(scope, receive, send)
        except SimError as error:
            await self._send_error(send, style, error)
        except protocols.ProtocolError as error:
            await self._send_error(send, style, SimError(error.status, error.message))
        except ClientDisconnected:
            self.stats.cancelled += 1

    def _provider_route(self, path: str) -> tuple:
        """The routes of other providers' protocols: Anthropic, Gemini, Azure OpenAI's deployment URLs."""
        if path == "/v1/messages":
            return self._anthropic, "anthropic"
        if path == "/v1/messages/count_tokens":
            return self._anthropic_count, "anthropic"
        if path.startswith(("/v1beta/models/", "/v1/models/")) and (path.endswith(":generateContent")
                                                                     or path.endswith(":streamGenerateContent")):
            return self._gemini, "gemini"
        if path.startswith("/openai/deployments/") and path.endswith("/chat/completions"):
            return self._azure_chat, "azure"
        return None, "openai"

    def _authorized(self, scope: Scope, style: str) -> bool:
        """Each provider's way of presenting a key: Bearer (vLLM, OpenAI), x-api-key, x-goog-api-key or ?key=,
        api-key (Azure)."""
        key = self.settings.api_key.encode()
        wanted = {"openai": (b"authorization", b"Bearer " + key), "anthropic": (b"x-api-key", key),
                  "gemini": (b"x-goog-api-key", key), "azure": (b"api-key", key)}[style]
        if any(pair == wanted for pair in scope["headers"]):
            return True
        if style == "anthropic":  # the anthropic SDK's auth_token= sends a bearer token instead
            return (b"authorization", b"Bearer " + key) in scope["headers"]
        return style == "gemini" and b"key=" + key in scope.get("query_string", b"").split(b"&")

    async def _send_error(self, send: Send, style: str, error: SimError) -> None:
        if style == "anthropic":
            body = protocols.anthropic_error(error.status, error.message)
        elif style == "gemini":
            body = protocols.gemini_error(error.status, error.message)
        elif error.status == 401 and style == "openai":
            body = b'{"error":"Unauthorized"}'  # vLLM's answer, word for word
        else:
            body = error.body()
        await send_response(send, error.status, body)

    # -- other providers' protocols ----------------------------------------------------------------------------

    async def _anthropic(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not header(scope, b"anthropic-version"):
            raise SimError(400, "anthropic-version: header is required")
        body = protocols.from_anthropic(await self._json_body(receive))
        await self._chat_body(scope, receive, send, body, protocols.AnthropicWriter)

    async def _anthropic_count(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Anthropic's ``POST /v1/messages/count_tokens``: the input tokens of a Messages request."""
        messages = protocols.from_anthropic(await self._json_body(receive)).get("messages") or []
        await send_response(send, 200, orjson.dumps({"input_tokens": _chat_prompt_tokens(messages)}))

    async def _gemini(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"]  # google-genai posts to /v1 when given a base URL with no version
        model, _, action = path.removeprefix("/v1beta/models/").removeprefix("/v1/models/").partition(":")
        body = protocols.from_gemini(await self._json_body(receive), model, action == "streamGenerateContent")
        await self._chat_body(scope, receive, send, body, protocols.GeminiWriter)

    async def _azure_chat(self, scope: Scope, receive: Receive, send: Send) -> None:
        if b"api-version=" not in scope.get("query_string", b""):
            raise SimError(404, "Resource not found")  # Azure's answer to a URL without api-version
        body = await self._json_body(receive)
        body["model"] = scope["path"].split("/")[3]  # the deployment name
        await self._chat_body(scope, receive, send, body)

    # -- OpenAI endpoints ------------------------------------------------------------------------------------

    async def _chat(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._chat_body(scope, receive, send, await self._json_body(receive))

    async def _chat_body(self, scope: Scope, receive: Receive, send: Send, body: dict, writer: type | None = None
                         ) -> None:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise SimError(400, "'messages' must be a non-empty list", param="messages")
        prompt = "\n".join(f"{m.get('role')}: {text_of(m.get('content'))}" for m in messages if isinstance(m, dict))
        if "guard" in str(body.get("model", "")).lower():  # a Llama Guard: its verdict on the conversation
            conversation = " ".join(text_of(m.get("content")) for m in messages if isinstance(m, dict))
            prompt = f"sim:say[{guard.llama_guard_verdict(conversation)}]"
        await self._generate(scope, receive, send, body, "chat", [prompt], _chat_prompt_tokens(messages), writer)

    async def _responses(self, scope: Scope, receive: Receive, send: Send) -> None:
        """OpenAI's Responses API, as vLLM serves it (without stored responses)."""
        body = protocols.from_responses(await self._json_body(receive))
        await self._chat_body(scope, receive, send, body, protocols.ResponsesWriter)

    async def _moderations(self, scope: Scope, receive: Receive, send: Send) -> None:
        """OpenAI's moderations, as a guard model would answer them (see gateway.sim.guard)."""
        body = await self._json_body(receive)
        value = body.get("input")
        items = [value] if isinstance(value, str) else [v for v in value or () if isinstance(v, (str, dict))]
        texts = [item if isinstance(item, str) else str(item.get("text", "")) for item in items]
        if not texts:
            raise SimError(400, "'input' must be a string or a non-empty list", param="input")
        await self._inject_faults(receive)
        if self.settings.ttft_ms:
            await asyncio.sleep(self.settings.ttft_ms / 1000)
        await send_response(send, 200, orjson.dumps({"id": _id("modr"), "model": self._served_model(body),
                                                     "results": [guard.moderation(text) for text in texts]}))

    async def _completions(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = await self._json_body(receive)
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            prompts = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            prompts = prompt
        elif isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
            prompts = [" ".join(map(str, prompt))]
        else:
            raise SimError(400, "'prompt' must be a string, a list of strings or a list of token ids", param="prompt")
        prompt_tokens = sum(generate.count_tokens(p) for p in prompts)
        await self._generate(scope, receive, send, body, "text", prompts, prompt_tokens)

    async def _embeddings(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = await self._json_body(receive)
        model = self._served_model(body)
        inputs = body.get("input")
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, list) or not inputs:
            raise SimError(400, "'input' must be a string or a non-empty list", param="input")
        texts = [" ".join(map(str, i)) if isinstance(i, list) else str(i) for i in inputs]
        if all(isinstance(i, int) for i in inputs):
            texts = [" ".join(map(str, inputs))]
        dimensions = body.get("dimensions") or self.settings.embedding_dim
        encoding = body.get("encoding_format") or "float"
        await self._inject_faults(receive)
        data = []
        for index, text in enumerate(texts):
            vector = generate.embedding(text, dimensions)
            value: Any = vector
            if encoding == "base64":
                import base64

                value = base64.b64encode(generate.pack_float32(vector)).decode()
            data.append({"object": "embedding", "index": index, "embedding": value})
        tokens = sum(generate.count_tokens(t) for t in texts)
        self.stats.prompt_tokens += tokens
        self.stats.completed += 1
        response = {"object": "list", "id": _id("embd"), "created": int(time.time()), "model": model,
                    "data": data, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
        await send_response(send, 200, orjson.dumps(response))

    # -- generation --------------------------------------------------------------------------------------------

    async def _generate(self, scope: Scope, receive: Receive, send: Send, body: dict, kind: str,
                        prompts: list[str], prompt_tokens: int, writer: type | None = None) -> None:
        """Generate the answers of one request and write them in OpenAI's format (or ``writer``'s: another
        provider's); ``body`` is in OpenAI's terms."""
        model = self._served_model(body)
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
        if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
            raise SimError(400, "max_tokens must be a positive integer", param="max_tokens")
        n = body.get("n") or 1
        if not isinstance(n, int) or n < 1:
            raise SimError(400, "n must be a positive integer", param="n")
        if prompt_tokens + (max_tokens or 0) > self.settings.max_model_len:
            raise SimError(400, f"This model's maximum context length is {self.settings.max_model_len} tokens. "
                                f"However, you requested {prompt_tokens + (max_tokens or 0)} tokens.")
        await self._inject_faults(receive)
        completions = [
            _structured(body, kind, prompt, index, max_tokens)
            or generate.complete(prompt, max_tokens, index, bool(body.get("ignore_eos")))
            for prompt in prompts for index in range(n)
        ]
        completion_tokens = sum(len(c.tokens) for c in completions)
        kv = prompt_tokens + completion_tokens
        self.waiting += 1
        adapter = model if model in self.lora.registered else None
        async with self._slots:
            self.waiting -= 1
            self.running += 1
            self.kv_tokens_in_use += kv
            try:
                if adapter is not None:
                    await self.lora.acquire(adapter)
                options = (writer or _Options)(body, kind, model, prompt_tokens, completion_tokens)
                if body.get("stream"):
                    async with DisconnectGuard(receive):
                        await self._stream(send, options, completions)
                else:
                    delay = self.settings.ttft_ms + self.settings.itl_ms * max(0, completion_tokens - 1)
                    if delay:
                        async with DisconnectGuard(receive):
                            await asyncio.sleep(delay / 1000)
                    await send_response(send, 200, options.full_body(completions))
            finally:
                if adapter is not None:
                    await self.lora.release(adapter)
                self.running -= 1
                self.kv_tokens_in_use -= kv
        self.stats.prompt_tokens += prompt_tokens
        self.stats.generation_tokens += completion_tokens
        self.stats.completed += 1

    async def _stream(self, send: Send, options: "_Options", completions: list[generate.Completion]) -> None:
        settings = self.settings
        if settings.ttft_ms:
            await asyncio.sleep(settings.ttft_ms / 1000)
        await start_stream(send, 200)
        opening = options.opening(completions)
        if opening:
            await send_chunk(send, opening)
        gap = (settings.itl_ms + settings.slow_stream_ms) / 1000
        longest = max(len(c.tokens) for c in completions)
        sent = 0
        for position in range(longest):
            if settings.break_stream_after is not None and sent >= settings.break_stream_after:
                self.stats.streams_broken += 1
                raise ConnectionAbortedError("simulated broken stream")
            if position and gap:
                await asyncio.sleep(gap)
            parts = []
            for index, completion in enumerate(completions):
                if position < len(completion.tokens):
                    parts.append(options.token_chunk(index, completion, position))
            await send_chunk(send, b"".join(parts))
            sent += 1
        await send_chunk(send, options.closing(completions))
        await end_stream(send)

    async def _inject_faults(self, receive: Receive) -> None:
        settings = self.settings
        self.stats.requests += 1
        if settings.error_rate and self._random.random() < settings.error_rate:
            self.stats.errors_injected += 1
            status = settings.error_status
            kind = {429: "RateLimitError", 503: "ServiceUnavailableError"}.get(status, "InternalServerError")
            raise SimError(status, f"simulated upstream error {status}", kind)
        if settings.hang_rate and self._random.random() < settings.hang_rate:
            self.stats.hangs_injected += 1
            while (await receive())["type"] != "http.disconnect":
                pass
            raise ClientDisconnected

    def _served_model(self, body: dict) -> str:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise SimError(400, "'model' must be a non-empty string", param="model")
        if self.settings.models and model not in self.settings.models and model not in self.lora.registered:
            raise SimError(404, f"The model `{model}` does not exist.", "NotFoundError", "model")
        return model

    async def _json_body(self, receive: Receive) -> dict:
        raw = await read_body(receive, MAX_BODY)
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise SimError(400, "the body is not valid JSON") from None
        if not isinstance(body, dict):
            raise SimError(400, "the body must be a JSON object")
        if self.settings.record_requests:
            self.recorded.append(body)
        return body

    # -- models, adapters, health, metrics -------------------------------------------------------------------

    async def _models(self, scope: Scope, receive: Receive, send: Send) -> None:
        base = self.settings.models or ["sim"]
        cards = [{"id": m, "object": "model", "created": self._created, "owned_by": "vllm", "root": m,
                  "parent": None, "max_model_len": self.settings.max_model_len} for m in base]
        cards += [{"id": name, "object": "model", "created": self._created, "owned_by": "vllm", "root": path,
                   "parent": base[0], "max_model_len": None} for name, path in self.lora.registered.items()]
        await send_response(send, 200, orjson.dumps({"object": "list", "data": cards}))

    async def _load_lora(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = await self._json_body(receive)
        failing = self.settings.lora_load_error_status
        if failing:  # as vLLM answers a path it cannot load
            raise SimError(failing, f"Loading lora {body.get('lora_name')} failed: No adapter found for "
                                    f"{body.get('lora_path')}", "BadRequestError" if failing < 500 else
                           "InternalServerError")
        name = _text(body.get("lora_name"))
        if name is not None and name in self.settings.models:  # as vLLM refuses it
            raise SimError(400, f"The lora adapter '{name}' conflicts with a served base model.", "BadRequestError",
                           "lora_name")
        path = _text(body.get("lora_path"))
        # vLLM reads a local adapter and checks it against its base model; one at a URL is a resolver plugin's
        if self.settings.base_config and path and "://" not in path:
            try:
                adapters.check(path, orjson.loads(Path(self.settings.base_config).read_bytes()))
            except (adapters.AdapterMismatch, OSError, ValueError, KeyError) as exc:
                raise SimError(400, f"Loading lora {name} failed: {exc}", "BadRequestError") from None
        await self._lora_call(send, self.lora.load(name, path))

    async def _unload_lora(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = await self._json_body(receive)
        await self._lora_call(send, self.lora.unload(_text(body.get("lora_name"))))

    async def _lora_call(self, send: Send, action) -> None:
        try:
            message = await action
        except LoraError as error:
            raise SimError(error.status, error.message, error.type) from None
        await send_response(send, 200, message.encode(), content_type=b"text/plain; charset=utf-8")

    async def _health(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send_response(send, 200, b"", content_type=b"text/plain")

    async def _version(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send_response(send, 200, b'{"version":"gateway-simulator"}')

    async def _metrics(self, scope: Scope, receive: Receive, send: Send) -> None:
        label = f'model_name="{(self.settings.models or ["sim"])[0]}"'
        lines = [
            "# HELP vllm:num_requests_running Number of requests in model execution batches.",
            "# TYPE vllm:num_requests_running gauge",
            f"vllm:num_requests_running{{{label}}} {float(self.running)}",
            "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.",
            "# TYPE vllm:num_requests_waiting gauge",
            f"vllm:num_requests_waiting{{{label}}} {float(self.waiting)}",
            "# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.",
            "# TYPE vllm:kv_cache_usage_perc gauge",
            f"vllm:kv_cache_usage_perc{{{label}}} {min(1.0, self.kv_tokens_in_use / self.settings.kv_cache_tokens)}",
            "# HELP vllm:lora_requests_info Running stats on lora requests.",
            "# TYPE vllm:lora_requests_info gauge",
            f'vllm:lora_requests_info{{max_lora="{self.lora.max_loras}",'
            f'running_lora_adapters="{",".join(self.lora.running)}",'
            f'waiting_lora_adapters="{",".join(self.lora.waiting)}"}} {time.time()}',
            "# HELP vllm:prompt_tokens_total Number of prefill tokens processed.",
            "# TYPE vllm:prompt_tokens_total counter",
            f"vllm:prompt_tokens_total{{{label}}} {float(self.stats.prompt_tokens)}",
            "# HELP vllm:generation_tokens_total Number of generation tokens processed.",
            "# TYPE vllm:generation_tokens_total counter",
            f"vllm:generation_tokens_total{{{label}}} {float(self.stats.generation_tokens)}",
        ]
        await send_response(send, 200, ("\n".join(lines) + "\n").encode(),
                            content_type=b"text/plain; version=0.0.4; charset=utf-8")

    # -- test controls ---------------------------------------------------------------------------------------

    async def _control(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] == "POST":
            changes = await self._json_body(receive)
            problems = self.settings.update(changes)
            if problems:
                raise SimError(400, "; ".join(problems))
            self.lora.max_loras = self.settings.max_loras
            self.lora.swap_seconds = self.settings.lora_swap_ms / 1000
        await send_response(send, 200, orjson.dumps(self.settings.as_dict()))

    async def _stats(self, scope: Scope, receive: Receive, send: Send) -> None:
        stats = dict(vars(self.stats), running=self.running, waiting=self.waiting, lora_loads=self.lora.loads,
                     lora_unloads=self.lora.unloads, lora_swaps=self.lora.swaps, lora_active=list(self.lora.active),
                     lora_registered=list(self.lora.registered))
        await send_response(send, 200, orjson.dumps(stats))

    async def _requests(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send_response(send, 200, orjson.dumps(list(self.recorded)))

    async def _reset(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.stats.reset()
        self.lora.loads = self.lora.unloads = self.lora.swaps = 0
        self.recorded.clear()
        await send_response(send, 200, b"{}")


class _Options:
    """What one generation request asked for, and how its answer is written."""

    __slots__ = ("body", "kind", "model", "prompt_tokens", "completion_tokens", "id", "created", "logprobs",
                 "top_logprobs", "include_usage", "tool_name")

    def __init__(self, body: dict, kind: str, model: str, prompt_tokens: int, completion_tokens: int) -> None:
        self.body, self.kind, self.model = body, kind, model
        self.prompt_tokens, self.completion_tokens = prompt_tokens, completion_tokens
        self.id = _id("chatcmpl" if kind == "chat" else "cmpl")
        self.created = int(time.time())
        if kind == "chat":
            self.logprobs = bool(body.get("logprobs"))
            self.top_logprobs = int(body.get("top_logprobs") or 0)
        else:
            self.logprobs = body.get("logprobs") is not None
            self.top_logprobs = int(body.get("logprobs") or 0)
        options = body.get("stream_options")
        self.include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
        self.tool_name = forced_tool(body)[0] if kind == "chat" else None

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    # What a writer of answers provides (the Anthropic and Gemini writers in protocols.py too)

    def full_body(self, completions: list[generate.Completion]) -> bytes:
        return orjson.dumps(self.full_response(completions))

    def opening(self, completions: list[generate.Completion]) -> bytes:
        if self.kind != "chat":
            return b""
        return b"".join(self.chunk(index, {"role": "assistant", "content": ""}) for index in range(len(completions)))

    def closing(self, completions: list[generate.Completion]) -> bytes:
        parts = [self.final_chunk(i, c) for i, c in enumerate(completions)]
        if self.include_usage:
            parts.append(self.usage_chunk())
        parts.append(b"data: [DONE]\n\n")
        return b"".join(parts)

    def full_response(self, completions: list[generate.Completion]) -> dict:
        choices = []
        for index, completion in enumerate(completions):
            if self.kind == "chat":
                choice: dict[str, Any] = {"index": index, "message": self._message(completion),
                                          "logprobs": self._chat_logprobs(completion) if self.logprobs else None,
                                          "finish_reason": self._finish(completion)}
            else:
                choice = {"index": index, "text": completion.text,
                          "logprobs": self._text_logprobs(completion) if self.logprobs else None,
                          "finish_reason": completion.finish_reason}
            choices.append(choice)
        return {"id": self.id, "object": "chat.completion" if self.kind == "chat" else "text_completion",
                "created": self.created, "model": self.model, "choices": choices, "usage": self.usage()}

    def _message(self, completion: generate.Completion) -> dict:
        if self.tool_name:
            return {"role": "assistant", "content": None, "tool_calls": [
                {"id": _id("call"), "type": "function",
                 "function": {"name": self.tool_name, "arguments": completion.text}}]}
        return {"role": "assistant", "content": completion.text}

    def _finish(self, completion: generate.Completion) -> str:
        return "tool_calls" if self.tool_name else completion.finish_reason

    def _chat_logprobs(self, completion: generate.Completion, positions: range | None = None) -> dict:
        entries = []
        for position in positions if positions is not None else range(len(completion.tokens)):
            token, logprob = completion.tokens[position], completion.logprobs[position]
            top = generate.top_alternatives(token, logprob, self.top_logprobs, position)
            entries.append({"token": token, "logprob": logprob, "bytes": list(token.encode()),
                            "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in top]})
        return {"content": entries, "refusal": None}

    def _text_logprobs(self, completion: generate.Completion, positions: range | None = None) -> dict:
        positions = positions if positions is not None else range(len(completion.tokens))
        offsets, offset = [], 0
        for token in completion.tokens[: positions.start]:
            offset += len(token)
        for position in positions:
            offsets.append(offset)
            offset += len(completion.tokens[position])
        return {
            "tokens": [completion.tokens[p] for p in positions],
            "token_logprobs": [completion.logprobs[p] for p in positions],
            "top_logprobs": [dict(generate.top_alternatives(completion.tokens[p], completion.logprobs[p],
                                                            self.top_logprobs, p)) for p in positions],
            "text_offset": offsets,
        }

    def chunk(self, index: int, delta: dict, finish: str | None = None, logprobs: dict | None = None) -> bytes:
        if self.kind == "chat":
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": index, "text": delta.get("content", ""), "logprobs": logprobs, "finish_reason": finish}
            obj = "text_completion"
        payload = {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": [choice]}
        return b"data: " + orjson.dumps(payload) + b"\n\n"

    def token_chunk(self, index: int, completion: generate.Completion, position: int) -> bytes:
        logprobs = None
        if self.logprobs:
            span = range(position, position + 1)
            logprobs = (self._chat_logprobs(completion, span) if self.kind == "chat"
                        else self._text_logprobs(completion, span))
        token = completion.tokens[position]
        if self.tool_name:
            delta: dict = {"tool_calls": [{"index": 0, "function": {"arguments": token}}]}
            if position == 0:
                delta["tool_calls"][0].update(id=_id("call"), type="function")
                delta["tool_calls"][0]["function"]["name"] = self.tool_name
            return self.chunk(index, delta, logprobs=logprobs)
        return self.chunk(index, {"content": token}, logprobs=logprobs)

    def final_chunk(self, index: int, completion: generate.Completion) -> bytes:
        return self.chunk(index, {}, finish=self._finish(completion))

    def usage_chunk(self) -> bytes:
        payload = {"id": self.id, "object": "chat.completion.chunk" if self.kind == "chat" else "text_completion",
                   "created": self.created, "model": self.model, "choices": [], "usage": self.usage()}
        return b"data: " + orjson.dumps(payload) + b"\n\n"


def _structured(body: dict, kind: str, prompt: str, index: int, max_tokens: int | None) -> generate.Completion | None:
    """The answer as JSON when the request asks for it: a forced tool call's arguments, valid against the tool's
    parameters; content valid against response_format's json_schema; a JSON object for json_object."""
    if kind != "chat":
        return None
    seed = generate.seed_of(prompt, index)
    name, parameters = forced_tool(body)
    response_format = body.get("response_format")
    if name is not None:
        text = orjson.dumps(schema_json.instance(parameters, seed)).decode()
    elif isinstance(response_format, dict) and response_format.get("type") == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema")
        text = orjson.dumps(schema_json.instance(schema if isinstance(schema, dict) else {}, seed)).decode()
    elif isinstance(response_format, dict) and response_format.get("type") == "json_object" and (
            asked := _schema_in_prompt(prompt)) is not None:
        text = orjson.dumps(schema_json.instance(asked, seed)).decode()  # what the prompt asks for
    elif isinstance(response_format, dict) and response_format.get("type") == "json_object":
        # {"answer": "<the usual words>"}, one token a word, so that max_tokens still yields valid JSON
        words = generate.complete(prompt, max_tokens, index)
        tokens = list(words.tokens)
        tokens[0] = '{"answer": "' + tokens[0]
        tokens[-1] += '"}'
        return generate.Completion(tokens=tokens, logprobs=words.logprobs, finish_reason=words.finish_reason)
    else:
        return None
    tokens = schema_json.pieces(text, seed)
    finish = "stop"
    if max_tokens is not None and len(tokens) > max_tokens:
        tokens, finish = tokens[:max_tokens], "length"
    return generate.Completion(tokens=tokens, logprobs=[-0.01] * len(tokens), finish_reason=finish)


_KEYS_ASKED = re.compile(r"""\b(?:keys?|fields?|properties)\b([^\n]*)""")
_QUOTED = re.compile(r"""["'`]([A-Za-z_][\w-]*)["'`]""")


def _schema_in_prompt(prompt: str) -> dict | None:
    """The JSON a prompt asks for in JSON mode: a JSON schema written in it (what LangChain's json_mode and most
    "answer in JSON" prompts carry), or the keys it names ("with the keys 'setup' and 'punchline'")."""
    for start in [i for i, c in enumerate(prompt) if c == "{"][:50]:
        depth = 0
        for end in range(start, len(prompt)):
            depth += {"{": 1, "}": -1}.get(prompt[end], 0)
            if depth == 0:
                try:
                    found = orjson.loads(prompt[start:end + 1])
                except orjson.JSONDecodeError:
                    break
                if isinstance(found, dict) and isinstance(found.get("properties"), dict):
                    return found
                break
    keys = _KEYS_ASKED.search(prompt)
    if keys is not None:
        sentence = re.split(r"\.(?:\s|$)", keys.group(1), maxsplit=1)[0]
        names = list(dict.fromkeys(_QUOTED.findall(sentence)))
        if names:
            return {"type": "object", "properties": {name: {"type": "string"} for name in names},
                    "required": names}
    return None


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _id(prefix: str) -> str:
    return f"{prefix}-{random.getrandbits(64):016x}"


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return

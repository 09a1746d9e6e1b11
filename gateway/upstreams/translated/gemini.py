"""Chat completions to Gemini's ``generateContent``, on the gateway's own HTTP client, and its answers back.

The request: system and developer messages become ``systemInstruction``; user parts become text, ``inlineData``
(base64 images and files) and ``fileData`` (image URLs); an assistant's tool calls become ``functionCall`` parts and
tool messages ``functionResponse`` parts (named after the call they answer); turns of one role in a row are merged.
``generationConfig`` carries ``max_tokens``, ``temperature``, ``top_p``, ``top_k``, ``stop``, ``n``, ``seed``, the
penalties, and the response format (``responseJsonSchema``, or a JSON MIME type). Tools are declared with their JSON
schemas as they are (``parametersJsonSchema``); ``tool_choice`` becomes the function calling mode (``ANY`` with one
allowed name for a named function).

The answer: each candidate a choice, its text parts as content (thoughts are not shown), its function calls as tool
calls. Gemini gives a call no id of its own in older models, so the gateway makes one; a call's thought signature
(which Gemini wants back with the call in the next turn) rides in that id and is given back from it. Finish reasons
as OpenAI's (safety and recitation stops as ``content_filter``); usage with thinking tokens counted as completion
tokens, as they are billed. A stream is one answer an event; function calls arrive whole.
"""

from __future__ import annotations

import os
from typing import Any

import orjson

from gateway.upstreams.translated.common import (DONE, BrokenAnswer, ChunkWriter, Part, Turns, arguments,
                                                 completion, completion_id, max_tokens, stops, text_of, usage,
                                                 user_parts)

PROVIDER = "gemini"
SIGNATURE = "__thought__"  # between a call's id and its thought signature
_FINISH = {"STOP": "stop", "MAX_TOKENS": "length", "SAFETY": "content_filter", "RECITATION": "content_filter",
           "BLOCKLIST": "content_filter", "PROHIBITED_CONTENT": "content_filter", "SPII": "content_filter",
           "IMAGE_SAFETY": "content_filter"}
_MIME_BY_SUFFIX = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif",
                   ".webp": "image/webp", ".pdf": "application/pdf"}


def request(body: dict, stream: bool) -> tuple[str, dict]:
    model = body["model"]
    action = ":streamGenerateContent?alt=sse" if stream else ":generateContent"
    system, contents = _conversation(body.get("messages") or [])
    asked: dict[str, Any] = {"contents": contents}
    if system:
        asked["systemInstruction"] = {"parts": [{"text": system}]}
    config = _generation_config(body)
    if config:
        asked["generationConfig"] = config
    _tools(body, asked)
    return f"/models/{model}{action}", asked


def _conversation(messages: list) -> tuple[str, list[dict]]:
    system: list[str] = []
    contents = Turns("parts")
    names: dict[str, str] = {}  # a tool call's id -> its function's name (a functionResponse is named, not id'd)
    for index, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role in ("system", "developer"):
            if text_of(content):
                system.append(text_of(content))
        elif role == "user":
            contents.add("user", [_part(part) for part in user_parts(content, f"messages.{index}", PROVIDER)])
        elif role == "assistant":
            parts = [{"text": text_of(content)}] if text_of(content) else []
            for call in message.get("tool_calls") or ():
                function = call.get("function") or {}
                call_id, _, signature = str(call.get("id") or "").partition(SIGNATURE)
                names[call_id] = function.get("name", "")
                part: dict[str, Any] = {"functionCall": {"name": function.get("name", ""),
                                                         "args": arguments(function.get("arguments"))}}
                if signature:
                    part["thoughtSignature"] = signature
                parts.append(part)
            contents.add("model", parts)
        elif role in ("tool", "function"):
            call_id = str(message.get("tool_call_id") or "").partition(SIGNATURE)[0]
            name = names.get(call_id) or message.get("name") or call_id
            text = text_of(content)
            try:
                result = orjson.loads(text) if text.lstrip().startswith("{") else None
            except orjson.JSONDecodeError:
                result = None
            contents.add("user", [{"functionResponse": {"name": name, "response": result if isinstance(result, dict)
                                                        else {"result": text}}}])
    return "\n\n".join(system), contents.turns


def _part(part: Part) -> dict:
    if part.kind == "text":
        return {"text": part.data}
    if part.kind == "url":
        suffix = os.path.splitext(part.data.split("?", 1)[0])[1].lower()
        return {"fileData": {"fileUri": part.data, "mimeType": _MIME_BY_SUFFIX.get(suffix, "image/jpeg")}}
    return {"inlineData": {"mimeType": part.media_type, "data": part.data}}  # images, files and audio


def _generation_config(body: dict) -> dict:
    config: dict[str, Any] = {}
    limit = max_tokens(body)
    if limit is not None:
        config["maxOutputTokens"] = limit
    for name, field in (("temperature", "temperature"), ("top_p", "topP"), ("top_k", "topK"), ("n", "candidateCount"),
                        ("seed", "seed"), ("presence_penalty", "presencePenalty"),
                        ("frequency_penalty", "frequencyPenalty")):
        value = body.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            config[field] = value
    sequences = stops(body)
    if sequences:
        config["stopSequences"] = sequences
    response_format = body.get("response_format")
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "json_schema":
        config["responseMimeType"] = "application/json"
        schema = (response_format.get("json_schema") or {}).get("schema")
        if isinstance(schema, dict):
            config["responseJsonSchema"] = schema
    elif kind == "json_object":
        config["responseMimeType"] = "application/json"
    return config


def _tools(body: dict, asked: dict) -> None:
    functions = [t.get("function") for t in body.get("tools") or ()
                 if isinstance(t, dict) and t.get("type") == "function" and isinstance(t.get("function"), dict)]
    if functions:
        declarations = []
        for function in functions:
            declaration = {"name": function.get("name", ""), "description": function.get("description") or ""}
            if function.get("parameters"):
                declaration["parametersJsonSchema"] = function["parameters"]
            declarations.append(declaration)
        asked["tools"] = [{"functionDeclarations": declarations}]
    choice = body.get("tool_choice")
    calling: dict[str, Any] | None = None
    if choice == "none":
        calling = {"mode": "NONE"}
    elif choice == "required":
        calling = {"mode": "ANY"}
    elif choice == "auto":
        calling = {"mode": "AUTO"}
    elif isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        calling = {"mode": "ANY", "allowedFunctionNames": [choice["function"].get("name", "")]}
    if calling is not None and functions:
        asked["toolConfig"] = {"functionCallingConfig": calling}


# -- The answer ------------------------------------------------------------------------------------------------------

def _usage(metadata: Any) -> dict:
    metadata = metadata if isinstance(metadata, dict) else {}
    prompt = metadata.get("promptTokenCount") or 0
    completion_tokens = (metadata.get("candidatesTokenCount") or 0) + (metadata.get("thoughtsTokenCount") or 0)
    return usage(prompt, completion_tokens, metadata.get("cachedContentTokenCount") or 0)


def _call(part: dict) -> dict:
    call = part["functionCall"]
    call_id = call.get("id") or "call_" + os.urandom(12).hex()
    signature = part.get("thoughtSignature")
    return {"id": f"{call_id}{SIGNATURE}{signature}" if signature else call_id, "type": "function",
            "function": {"name": call.get("name", ""), "arguments": orjson.dumps(call.get("args") or {}).decode()}}


def _read(raw: bytes) -> dict:
    try:
        document = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BrokenAnswer("the provider's answer is not JSON") from None
    if not isinstance(document, dict):
        raise BrokenAnswer("the provider's answer is not an object")
    return document


def _finish(candidate: dict, called: bool) -> str | None:
    reason = candidate.get("finishReason")
    if reason is None:
        return None
    finish = _FINISH.get(reason, "stop")
    return "tool_calls" if called and finish == "stop" else finish


def answer(raw: bytes, model: str) -> bytes:
    document = _read(raw)
    choices = []
    for position, candidate in enumerate(document.get("candidates") or ()):
        parts = [p for p in (candidate.get("content") or {}).get("parts") or () if isinstance(p, dict)]
        texts = [p["text"] for p in parts if isinstance(p.get("text"), str) and not p.get("thought")]
        calls = [_call(p) for p in parts if isinstance(p.get("functionCall"), dict)]
        reply: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts or not calls else None}
        if calls:
            reply["tool_calls"] = calls
        choices.append({"index": candidate.get("index", position), "message": reply, "logprobs": None,
                        "finish_reason": _finish(candidate, bool(calls)) or "stop"})
    if not choices:  # the prompt itself was blocked (promptFeedback.blockReason)
        choices.append({"index": 0, "message": {"role": "assistant", "content": ""}, "logprobs": None,
                        "finish_reason": "content_filter"})
    answer_id = "chatcmpl-" + document["responseId"] if isinstance(document.get("responseId"), str) else None
    return orjson.dumps(completion(answer_id or completion_id(), document.get("modelVersion") or model, choices,
                                   _usage(document.get("usageMetadata"))))


class Stream:
    """Gemini's stream (one answer an event) in, chat completion chunks out."""

    def __init__(self, model: str) -> None:
        self.writer = ChunkWriter(completion_id(), model)
        self.metadata: dict | None = None
        self.started: set[int] = set()
        self.calls: dict[int, int] = {}  # a choice -> how many tool calls it has made
        self.finished: set[int] = set()

    def event(self, data: bytes) -> bytes:
        document = _read(data)
        if isinstance(document.get("usageMetadata"), dict):
            self.metadata = document["usageMetadata"]
        if not self.started and isinstance(document.get("responseId"), str):
            self.writer.id = "chatcmpl-" + document["responseId"]
        out = b""
        for position, candidate in enumerate(document.get("candidates") or ()):
            index = candidate.get("index", position)
            delta: dict[str, Any] = {}
            if index not in self.started:
                self.started.add(index)
                delta["role"] = "assistant"
            parts = [p for p in (candidate.get("content") or {}).get("parts") or () if isinstance(p, dict)]
            text = "".join(p["text"] for p in parts if isinstance(p.get("text"), str) and not p.get("thought"))
            calls = [_call(p) for p in parts if isinstance(p.get("functionCall"), dict)]
            if text or "role" in delta:
                delta["content"] = text
            if calls:
                made = self.calls.get(index, 0)
                delta["tool_calls"] = [{"index": made + n, **call} for n, call in enumerate(calls)]
                self.calls[index] = made + len(calls)
            finish = _finish(candidate, bool(self.calls.get(index)))
            if finish is not None:
                self.finished.add(index)
            if delta or finish is not None:
                out += self.writer.delta(index, delta, finish)
        if not document.get("candidates") and (document.get("promptFeedback") or {}).get("blockReason"):
            self.finished.add(0)
            out += self.writer.delta(0, {"role": "assistant", "content": ""}, "content_filter")
        return out

    def end(self) -> bytes:
        if not self.finished:
            raise BrokenAnswer("the provider's stream ended before a finish reason")
        return self.writer.usage(_usage(self.metadata)) + DONE


def headers(base: dict[str, str], api_key: str | None) -> dict[str, str]:
    kept = {k: v for k, v in base.items() if k.lower() != "authorization"}
    if api_key:
        kept["x-goog-api-key"] = api_key
    return kept

"""The output rules on the answer's way back: the ASGI ``send`` a request with output rules answers through.

A whole answer is checked before it leaves: a ``block`` empties its text and says ``content_filter`` as its finish
reason (as OpenAI does), a ``redact`` masks what was found. A stream is checked as it passes: the text of each
choice is held back by at most ``LOOK_BEHIND`` characters, so that what a rule finds (an e-mail address split
across two events, say) is found whole while the rest flows on; a ``block`` ends the stream with a chunk whose
finish reason is ``content_filter`` and stops reading the upstream, a ``redact`` masks within the stream. What a
rule finds must be shorter than ``LOOK_BEHIND`` to be found across events. Tool calls' arguments are checked in
whole answers only. The response cache keeps what the upstream said: a cached answer passes these rules again
each time it is served, so a policy changed since still applies.

A guard model that reads answers (``judge``) judges the whole text: a whole answer before it leaves, a stream held
until its end (a model's verdict on half an answer is no verdict), then sent at once, or cut to a
``content_filter`` chunk if the model blocks it.
"""

from __future__ import annotations

from typing import Awaitable, Callable

import orjson

from gateway.asgi import EVENT_STREAM, Send
from gateway.guardrails.policy import Guardrail, Verdict, inspect_text, mask
from gateway.pipeline.context import RequestContext
from gateway.upstreams.sse import EventSplitter

LOOK_BEHIND = 256


class OutputGuard:
    __slots__ = ("ctx", "send", "rules", "verdict", "judge", "mode", "start", "held", "events", "held_text", "ended")

    def __init__(self, ctx: RequestContext, send: Send, rules: tuple[Guardrail, ...], verdict: Verdict,
                 judge: Callable[[str], Awaitable[bool]] | None = None) -> None:
        self.ctx, self.send, self.rules, self.verdict, self.judge = ctx, send, rules, verdict, judge
        self.mode = ""
        self.start: dict | None = None
        self.held: list[bytes] = []
        self.events = EventSplitter()
        self.held_text: dict[int, str] = {}  # a choice's text not yet sent
        self.ended = False

    async def __call__(self, message: dict) -> None:
        if message["type"] == "http.response.start":
            content_type = next((v for k, v in message["headers"] if k == b"content-type"), b"")
            if message["status"] >= 400 or self.ctx.native_answer:
                self.mode = "pass"
            elif content_type.startswith(EVENT_STREAM):
                self.mode = "stream"
            else:
                self.mode, self.start = "whole", message
                return
            await self.send(message)
            return
        if message["type"] != "http.response.body" or self.mode == "pass":
            await self.send(message)
            return
        body, more = message.get("body", b""), message.get("more_body", False)
        if self.mode == "whole":
            self.held.append(body)
            if not more:
                await self._whole(b"".join(self.held))
            return
        if self.ended:  # blocked: what the upstream still sends goes nowhere; the stream's end still does
            if not more:
                await self.send(message)
            return
        if self.judge is not None:  # the whole stream is judged before any of it leaves
            self.held.append(body)
            if more:
                return
            body = b"".join(self.held)
            if await self.judge(_streamed_text(body)):
                self.ended = True
                await self.send({"type": "http.response.body", "body": _cut_stream(body), "more_body": False})
                return
        out = self._events(body)
        await self.send({"type": "http.response.body", "body": out, "more_body": more})

    # A whole answer

    async def _whole(self, body: bytes) -> None:
        try:
            answer = orjson.loads(body)
        except orjson.JSONDecodeError:
            answer = None
        if isinstance(answer, dict) and self._check_answer(answer):
            body = orjson.dumps(answer)
        elif isinstance(answer, dict) and self.judge is not None and await self.judge(_answer_text(answer)):
            _filter_choices(answer)
            body = orjson.dumps(answer)
        headers = [(k, v) for k, v in self.start["headers"] if k != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await self.send({**self.start, "headers": headers})
        await self.send({"type": "http.response.body", "body": body})

    def _check_answer(self, answer: dict) -> bool:
        """Check (and change) the answer's choices; whether anything changed."""
        changed = False
        for choice in answer.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            message = choice.get("message")
            holder, key = (message, "content") if isinstance(message, dict) else (choice, "text")
            texts = [(holder, key)] if isinstance(holder.get(key), str) else []
            if isinstance(message, dict):
                for call in message.get("tool_calls") or ():
                    function = call.get("function") if isinstance(call, dict) else None
                    if isinstance(function, dict) and isinstance(function.get("arguments"), str):
                        texts.append((function, "arguments"))
            for container, name in texts:
                text, blocked = inspect_text(self.rules, container[name], self.verdict)
                if blocked is not None:
                    _filter(choice)
                    return True
                if text != container[name]:
                    container[name] = text
                    changed = True
        return changed

    # A stream

    def _events(self, data: bytes) -> bytes:
        out = []
        for event in self.events.feed(data):
            if self.ended:
                break
            out.append(self._event(event))
        return b"".join(out)

    def _event(self, event: bytes) -> bytes:
        if not event.startswith(b"data: "):
            return event + b"\n\n"
        payload = event[6:]
        if payload == b"[DONE]":
            return self._flush_all() + event + b"\n\n"
        try:
            chunk = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return event + b"\n\n"
        if not isinstance(chunk, dict) or not isinstance(chunk.get("choices"), list):
            return event + b"\n\n"
        for choice in chunk["choices"]:
            if not isinstance(choice, dict):
                continue
            index = choice.get("index", 0)
            delta = choice.get("delta")
            holder, key = (delta, "content") if isinstance(delta, dict) else (choice, "text")
            text = holder.get(key) if isinstance(holder, dict) else None
            if isinstance(text, str):
                self.verdict.streamed.append(text)
            held = self.held_text.get(index, "") + (text if isinstance(text, str) else "")
            final = choice.get("finish_reason") is not None
            sent, blocked = self._pass(held, final)
            if blocked is not None:
                return self._cut(chunk, index)
            self.held_text[index] = held[len(sent[1]):] if not final else ""
            if isinstance(holder, dict) and (isinstance(text, str) or final):
                holder[key] = sent[0]
        return b"data: " + orjson.dumps(chunk) + b"\n\n"

    def _pass(self, held: str, final: bool) -> tuple[tuple[str, str], Guardrail | None]:
        """What of a choice's held text may go now: (masked, raw) of it, or the rule that blocks."""
        spans: list[tuple[int, int, Guardrail]] = []
        for rule in self.rules:
            for start, end in rule.detect(held):
                spans.append((start, end, rule))
        cut = len(held) if final else max(0, len(held) - LOOK_BEHIND)
        for start, end, rule in spans:
            if start < cut < end:  # never send half of what a rule found
                cut = start
        sent_spans = [(s, e, r) for s, e, r in spans if e <= cut]
        for start, end, rule in sent_spans:
            self.verdict.add(rule, "output")
            if rule.action == "block":
                return ("", ""), rule
        raw = held[:cut]
        masked = raw
        for rule in {r for *_, r in sent_spans if r.action == "redact"}:
            masked = mask(masked, rule.detect(masked), rule.placeholder)
        return (masked, raw), None

    def _flush_all(self) -> bytes:
        """Text still held when the stream ends without a finish reason: sent (masked) in a chunk of its own."""
        out = b""
        for index, held in list(self.held_text.items()):
            if not held:
                continue
            (masked, _), blocked = self._pass(held, final=True)
            self.held_text[index] = ""
            if blocked is not None:
                return self._cut({"choices": []}, index)
            out += b"data: " + orjson.dumps({"choices": [{"index": index, "delta": {"content": masked},
                                                          "finish_reason": None}]}) + b"\n\n"
        return out

    def _cut(self, chunk: dict, index: int) -> bytes:
        """End the stream here: the choice finishes with ``content_filter``."""
        self.ended = True
        self.ctx.answer_cut = True  # the relay stops reading the upstream
        return _filtered_chunk(chunk, index, {}) + b"data: [DONE]\n\n"


def _filter(choice: dict) -> None:
    """A choice a rule blocked: no text, no tool call, finished by the content filter."""
    message = choice.get("message")
    if isinstance(message, dict):
        message["content"] = None
        message.pop("tool_calls", None)
    else:
        choice["text"] = ""
    choice["finish_reason"] = "content_filter"


def _filter_choices(answer: dict) -> None:
    for choice in answer.get("choices") or ():
        if isinstance(choice, dict):
            _filter(choice)


def _choice_texts(choice: object, part: str) -> list[str]:
    """A choice's text and its tool calls' arguments; ``part`` is "message" (a whole answer) or "delta" (a stream's
    chunk); a completion's choice has ``text``."""
    if not isinstance(choice, dict):
        return []
    holder = choice.get(part)
    if not isinstance(holder, dict):
        return [choice["text"]] if isinstance(choice.get("text"), str) else []
    texts = [holder["content"]] if isinstance(holder.get("content"), str) else []
    for call in holder.get("tool_calls") or ():
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict) and isinstance(function.get("arguments"), str):
            texts.append(function["arguments"])
    return texts


def _answer_text(answer: dict) -> str:
    """A whole answer's text as a guard model reads it: every choice's text and tool calls' arguments."""
    return "\n".join(text for choice in answer.get("choices") or () for text in _choice_texts(choice, "message")
                     if text)


def _stream_chunks(body: bytes):
    for event in EventSplitter().feed(body + b"\n\n"):
        if event.startswith(b"data: ") and event[6:] != b"[DONE]":
            try:
                chunk = orjson.loads(event[6:])
            except orjson.JSONDecodeError:
                continue
            if isinstance(chunk, dict):
                yield chunk


def _streamed_text(body: bytes) -> str:
    """A held stream's text: its choices' content and tool calls' arguments, in order."""
    return "".join(text for chunk in _stream_chunks(body) for choice in chunk.get("choices") or ()
                   for text in _choice_texts(choice, "delta"))


def _cut_stream(body: bytes) -> bytes:
    """What a client gets of a stream a guard model blocked: one chunk finished by the content filter (with the
    stream's usage, if it carried one), then [DONE]."""
    chunks = list(_stream_chunks(body))
    out = _filtered_chunk(chunks[0] if chunks else {}, 0, {"role": "assistant"})
    usage = next((c for c in reversed(chunks) if c.get("usage") and not c.get("choices")), None)
    if usage is not None:
        out += b"data: " + orjson.dumps(usage) + b"\n\n"
    return out + b"data: [DONE]\n\n"


def _filtered_chunk(like: dict, index: int, delta: dict) -> bytes:
    """The event of a chunk (with the id, object, created and model of ``like``) whose choice ``index`` finishes
    with ``content_filter``."""
    head = {k: v for k, v in like.items() if k in ("id", "object", "created", "model")}
    choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": "content_filter"}
    return b"data: " + orjson.dumps({**head, "choices": [choice]}) + b"\n\n"

"""Relaying a server-sent-event stream event by event, reading the usage on the way past.

Chunks from the upstream are split at event boundaries and every complete event is passed on as soon as it has
arrived. The event carrying ``usage`` is parsed; when the gateway asked for usage on the client's behalf (so that
streams can be accounted), that usage-only event is dropped so the client sees exactly what it asked for.
"""

from __future__ import annotations

import orjson


def complete_events(pending: bytes, chunk: bytes) -> tuple[bytes, bytes]:
    """What has arrived so far (``pending`` then ``chunk``) cut after its last blank line: the complete events, each
    ending in its blank line, and what must wait for the next chunk. Line ends are read as ``\n``."""
    if b"\r" in chunk:
        chunk = chunk.replace(b"\r\n", b"\n")
    data = pending + chunk if pending else chunk
    end = data.rfind(b"\n\n")
    if end < 0:
        return b"", data
    return data[:end + 2], data[end + 2:]


class SSERelay:
    __slots__ = ("_pending", "_drop_usage_event", "usage")

    def __init__(self, drop_usage_event: bool) -> None:
        self._pending = b""
        self._drop_usage_event = drop_usage_event
        self.usage: dict | None = None

    def feed(self, chunk: bytes) -> bytes:
        """The complete events in what has arrived so far, ready to send on."""
        complete, self._pending = complete_events(self._pending, chunk)
        if b'"usage":' not in complete and b'"usage" :' not in complete:
            return complete
        return self._inspect(complete)

    def finish(self) -> bytes:
        """Whatever is left when the upstream closes (a last event without its blank line)."""
        rest, self._pending = self._pending, b""
        if rest and (b'"usage"' in rest):
            return self._inspect(rest)
        return rest

    def _inspect(self, complete: bytes) -> bytes:
        kept = []
        for event in complete.split(b"\n\n"):
            if not event:
                continue
            data = event.find(b"data:")  # after an "event:" line, in Anthropic's and the Responses API's streams
            if b'"usage"' in event and (data == 0 or (data > 0 and event[data - 1:data] == b"\n")):
                payload = event[data + 5:].strip()
                try:
                    parsed = orjson.loads(payload)
                except orjson.JSONDecodeError:
                    parsed = None
                if isinstance(parsed, dict) and isinstance(parsed.get("usage"), dict):
                    # Anthropic's stream counts input tokens at its start and output tokens at its end
                    self.usage = {**self.usage, **parsed["usage"]} if self.usage else parsed["usage"]
                    if self._drop_usage_event and not parsed.get("choices"):
                        continue
                elif isinstance(parsed, dict):  # Anthropic's message_start, the Responses API's last event
                    inner = parsed.get("message") or parsed.get("response")
                    if isinstance(inner, dict) and isinstance(inner.get("usage"), dict):
                        self.usage = {**self.usage, **inner["usage"]} if self.usage else inner["usage"]
            kept.append(event)
        return b"\n\n".join(kept) + b"\n\n" if kept else b""


class EventSplitter:
    """Complete events out of a stream's chunks as they arrive; what follows the last blank line waits for the
    next chunk (``rest`` hands it over when the stream ends)."""

    __slots__ = ("pending",)

    def __init__(self) -> None:
        self.pending = b""

    def feed(self, data: bytes) -> list[bytes]:
        complete, self.pending = complete_events(self.pending, data)
        return [event for event in complete.split(b"\n\n") if event]

    def rest(self) -> bytes:
        rest, self.pending = self.pending, b""
        return rest


def event_data(event: bytes) -> bytes:
    """The data of one event: its ``data:`` lines joined (a chat completion chunk is one line)."""
    if event.startswith(b"data: ") and b"\n" not in event:
        return event[6:]
    return b"".join(line[5:].strip() for line in event.split(b"\n") if line.startswith(b"data:"))

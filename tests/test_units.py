"""Small pieces of the request path checked on their own."""

from __future__ import annotations

import subprocess
import sys

import orjson
import pytest

from gateway.config.types import Deployment
from gateway.settings import Settings
from gateway.upstreams.errors import from_upstream_response
from gateway.upstreams.sse import SSERelay
from gateway.upstreams.usage import usage_of

DEPLOYMENT = Deployment(name="d", model="m", upstream_model="u", api_base="http://x", api_key=None, headers={},
                        connect_timeout=1, read_timeout=1, priority=0, is_simulator=False)


def _event(payload: dict) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def test_relay_passes_events_split_anywhere_and_reads_usage():
    events = [_event({"choices": [{"delta": {"content": f"t{i}"}}], "usage": None}) for i in range(3)]
    usage = _event({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4}})
    stream = b"".join(events) + usage + b"data: [DONE]\n\n"
    for cut in range(1, len(stream)):
        relay = SSERelay(drop_usage_event=True)
        out = relay.feed(stream[:cut]) + relay.feed(stream[cut:]) + relay.finish()
        assert out == b"".join(events) + b"data: [DONE]\n\n"
        assert relay.usage == {"prompt_tokens": 3, "completion_tokens": 4}


def test_relay_keeps_usage_the_client_asked_for_and_handles_crlf():
    usage = _event({"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2}})
    relay = SSERelay(drop_usage_event=False)
    assert relay.feed(usage.replace(b"\n", b"\r\n")) == usage
    assert relay.usage["completion_tokens"] == 2


def test_usage_is_read_from_the_end_of_a_large_body():
    body = orjson.dumps({"data": [{"embedding": [0.1] * 5000}], "usage": {"prompt_tokens": 9, "total_tokens": 9,
                                                                          "details": {"cached": 0}}})
    assert usage_of(body) == {"prompt_tokens": 9, "total_tokens": 9, "details": {"cached": 0}}
    assert usage_of(b'{"usage": {"prompt_tokens": 1}, "x": "}"}') == {"prompt_tokens": 1}
    assert usage_of(b"not json") is None
    assert usage_of(b'{"choices": []}') is None


def test_upstream_errors_of_every_shape_become_openai_errors():
    old_vllm = orjson.dumps({"object": "error", "message": "bad prompt", "type": "BadRequestError",
                             "param": None, "code": 400})
    error = from_upstream_response(DEPLOYMENT, 400, old_vllm)
    assert (error.status, error.message, error.type) == (400, "bad prompt", "invalid_request_error")
    openai_shape = orjson.dumps({"error": {"message": "slow down", "type": "rate_limit_error", "param": None,
                                           "code": "rate_limit_exceeded"}})
    error = from_upstream_response(DEPLOYMENT, 429, openai_shape)
    assert (error.type, error.code) == ("rate_limit_error", "rate_limit_exceeded")
    error = from_upstream_response(DEPLOYMENT, 502, b"<html>Bad Gateway</html>")
    assert error.status == 502 and "Bad Gateway" in error.message and error.type == "upstream_error"
    error = from_upstream_response(DEPLOYMENT, 401, b'{"error": {"message": "Incorrect API key"}}')
    assert error.status == 502 and error.code == "upstream_auth_failed"  # not the client's key at fault
    error = from_upstream_response(DEPLOYMENT, 422, orjson.dumps({"detail": [{"loc": ["body"], "msg": "x"}]}))
    assert error.status == 422 and "loc" in error.message


def test_settings_out_of_range_stop_the_gateway_with_their_name():
    for name, raw in (("PORT", "99999"), ("PORT", "0"), ("WORKERS", "0"), ("MAX_BODY_BYTES", "-1"),
                      ("HEADER_TIMEOUT", "nan"), ("BODY_TIMEOUT", "inf"), ("RELOAD_INTERVAL", "0"),
                      ("LEDGER_RETENTION_DAYS", "-3"), ("LEDGER_BATCH_SIZE", "0"), ("SIMULATOR_ITL_MS", "-1"),
                      ("LIMITS_HEADROOM_SECONDS", "-1"), ("LIMITS_HEADROOM_SECONDS", "nan"),
                      ("LIMITS_HEADROOM_SECONDS", "1e9"), ("LIMITS_LEASE_SECONDS", "-1"),
                      ("LIMITS_LEASE_SECONDS", "nan"), ("LIMITS_LEASE_SECONDS", "11")):
        with pytest.raises(SystemExit, match=f"GATEWAY_{name}={raw!r}"):
            Settings.from_env({f"GATEWAY_{name}": raw})
    fine = Settings.from_env({"GATEWAY_PORT": "65535", "GATEWAY_LEDGER_RETENTION_DAYS": "0",
                              "GATEWAY_SIMULATOR_TTFT_MS": "0", "GATEWAY_LIMITS_HEADROOM_SECONDS": "0",
                              "GATEWAY_LIMITS_LEASE_SECONDS": "0"})
    assert fine.port == 65535 and fine.ledger_retention_days == 0 and fine.limits_headroom_seconds == 0
    assert fine.limits_lease_seconds == 0
    done = subprocess.run([sys.executable, "-m", "gateway.cli", "serve", "--port", "99999"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and "--port" in done.stderr and "Traceback" not in done.stderr


def test_amounts_in_refusals_keep_their_digits():
    from gateway.pipeline.limits import usd

    assert [usd(v) for v in (0, 12.5, 0.000345, 1e-320, 1e-12)] == ["$0", "$12.50", "$0.000345", "$1e-320",
                                                                      "$1e-12"]


def test_a_cluster_node_of_unknown_address_is_never_taken_for_6379():
    import asyncio

    from gateway.stores.cluster import ClusterRedis

    class Seed:
        async def execute(self, *args):
            return [[0, 8191, [b"127.0.0.1", 7001, b"id-a"]], [8192, 16383, [b"", 0, b"id-b"]]]

        async def close(self):
            pass

    cluster = ClusterRedis("redis+cluster://127.0.0.1:7001")
    cluster.nodes[("127.0.0.1", 7001)] = Seed()
    asyncio.run(cluster._read_slots())
    assert cluster.slots[0] == ("127.0.0.1", 7001)
    assert cluster.slots[16383] is None  # unknown, not 127.0.0.1:6379 (nor :0)


def test_an_answer_of_known_length_is_written_once_and_a_streams_head_at_once():
    from gateway.http_protocol import _HeadHolder

    class Transport:
        def __init__(self):
            self.writes, self.closed = [], False

        def write(self, data):
            self.writes.append(data)

        def close(self):
            self.closed = True

        def is_closing(self):
            return self.closed

    transport = Transport()
    holder = _HeadHolder(transport)
    holder.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n")
    assert transport.writes == []  # held for its body
    holder.write(b"{}")
    assert transport.writes == [
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"]
    holder.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
    assert len(transport.writes) == 2  # a stream's head: at once
    holder.write(b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 5\r\n\r\n")
    holder.close()  # the app failed before the body: the head goes, then the connection closes
    assert transport.writes[-1].startswith(b"HTTP/1.1 500") and transport.closed and holder.is_closing()


def test_the_kept_token_counts_equal_fresh_ones_and_stay_bounded():
    from gateway import tokens

    history = [{"role": "user", "content": f"Question {n}: what does a gateway do with turn {n}?"} for n in range(50)]
    long_text = "word " * (tokens.MEMO_TEXT_CHARACTERS // 2)
    body = {"messages": [*history, {"role": "user", "content": long_text}]}
    fresh = sum(len(tokens._encoding().encode_ordinary(m["content"])) + 3 for m in body["messages"]) + 3
    assert tokens.prompt_tokens(body) == fresh
    assert tokens.prompt_tokens(body) == fresh  # again, from the kept counts
    assert long_text not in tokens._counted  # longer than what is kept
    for n in range(tokens.MEMO_ENTRIES + 10):
        tokens.prompt_tokens({"prompt": f"text number {n}"})
    assert len(tokens._counted) <= tokens.MEMO_ENTRIES
    assert tokens.prompt_tokens({"prompt": "text number 7"}) == len(tokens._encoding().encode_ordinary("text number 7"))

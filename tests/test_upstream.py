"""Forwarding: what passes through untouched, and what the client sees when the upstream misbehaves."""

from __future__ import annotations

import json
import socket
import time

import openai
import pytest

HELLO = [{"role": "user", "content": "hi"}]


def test_everything_the_gateway_does_not_act_on_passes_through(client, sim):
    tools = [{"type": "function", "function": {
        "name": "lookup_ticket", "description": "Find a ticket",
        "parameters": {"type": "object", "properties": {"id": {"type": "string"}}, "required": ["id"]}}}]
    completion = client.chat.completions.create(
        model="small", messages=HELLO, tools=tools, tool_choice="required",
        response_format={"type": "json_object"}, logprobs=True, top_logprobs=2, seed=7, n=2, stop=["\n\n"],
        user="user-17", temperature=0.3, extra_body={"repetition_penalty": 1.1, "guided_choice": None},
    )
    forwarded = sim.last_request()
    assert forwarded["model"] == "sim-small"  # the logical name is replaced by the deployment's
    assert forwarded["tools"] == tools and forwarded["tool_choice"] == "required"
    assert forwarded["response_format"] == {"type": "json_object"}
    assert forwarded["logprobs"] is True and forwarded["top_logprobs"] == 2
    assert forwarded["seed"] == 7 and forwarded["n"] == 2 and forwarded["stop"] == ["\n\n"]
    assert forwarded["user"] == "user-17" and forwarded["temperature"] == 0.3
    assert forwarded["repetition_penalty"] == 1.1 and "guided_choice" in forwarded
    assert forwarded["messages"] == HELLO
    assert len(completion.choices) == 2
    call = completion.choices[0].message.tool_calls[0]
    assert call.function.name == "lookup_ticket" and json.loads(call.function.arguments)
    assert completion.choices[0].finish_reason == "tool_calls"


def test_logprobs_and_json_mode_come_back(client):
    completion = client.chat.completions.create(
        model="small", messages=HELLO, logprobs=True, top_logprobs=3, response_format={"type": "json_object"},
        max_tokens=5)
    choice = completion.choices[0]
    assert len(choice.logprobs.content) == 5 and len(choice.logprobs.content[0].top_logprobs) == 3
    assert "answer" in json.loads(choice.message.content)


def test_stream_passes_the_clients_stream_options_through(client, sim):
    list(client.chat.completions.create(model="small", messages=HELLO, stream=True,
                                        stream_options={"include_usage": True}))
    assert sim.last_request()["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize(
    "status, exception",
    [(400, openai.BadRequestError), (404, openai.NotFoundError), (429, openai.RateLimitError),
     (500, openai.InternalServerError), (503, openai.InternalServerError)],
)
def test_upstream_errors_keep_their_status_in_openai_shape(gateway, client, sim, status, exception):
    sim.control(error_rate=1.0, error_status=status)
    with pytest.raises(exception) as caught:
        client.chat.completions.create(model="small", messages=HELLO)
    assert caught.value.status_code == status
    assert f"simulated upstream error {status}" in caught.value.message
    assert isinstance(caught.value.body, dict) and "message" in caught.value.body
    line = gateway.request_log(caught.value.response.headers["x-request-id"])
    assert line["status"] == status and line["deployment"] == "sim-small"


def test_upstream_error_in_a_stream_request_is_a_plain_error(client, sim):
    sim.control(error_rate=1.0, error_status=503)
    with pytest.raises(openai.InternalServerError):
        list(client.chat.completions.create(model="small", messages=HELLO, stream=True))


def test_read_timeout_gives_504(gateway, client, sim):
    sim.control(hang_rate=1.0)
    started = time.monotonic()
    with pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(model="hasty", messages=HELLO)  # read timeout: 1 s
    assert caught.value.status_code == 504 and caught.value.code == "upstream_timeout"
    assert time.monotonic() - started < 10
    _wait_until(lambda: sim.stats()["cancelled"] >= 1)  # the abandoned upstream call was closed


def test_unreachable_upstream_gives_502(client):
    with pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(model="dead", messages=HELLO)
    assert caught.value.status_code == 502 and caught.value.code == "upstream_unreachable"


def test_broken_stream_ends_with_an_error_event(gateway, client, sim):
    sim.control(break_stream_after=3)
    received = []
    raw = client.chat.completions.with_raw_response.create(model="small", messages=HELLO, stream=True,
                                                           max_tokens=20)
    with pytest.raises(openai.APIError) as caught:
        for chunk in raw.parse():
            received.append(chunk)
    assert "broke off" in str(caught.value.message)
    assert len(received) >= 3  # what arrived before the break was delivered
    line = gateway.request_log(raw.headers["x-request-id"])
    assert line["status"] == 502 and line["error_type"] == "upstream_broken"


def _wait_until(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def _open_stream(gateway, keys, body: dict) -> socket.socket:
    payload = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", gateway.port))
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {keys.acme}\r\nContent-Length: {len(payload)}\r\n\r\n".encode() + payload
    )
    return sock


def test_client_leaving_a_stream_cancels_the_upstream_call(gateway, keys, sim):
    sim.control(itl_ms=200.0)
    sock = _open_stream(gateway, keys, {"model": "small", "messages": HELLO, "stream": True, "max_tokens": 50})
    assert b"200 OK" in sock.recv(65536)  # headers and the first events
    _wait_until(lambda: sim.stats()["running"] == 1)
    sock.close()
    _wait_until(lambda: sim.stats()["cancelled"] == 1 and sim.stats()["running"] == 0)
    assert sim.stats()["completed"] == 0
    line = _wait_for_log(gateway, lambda line: line.get("client_disconnected") and line["stream"])
    assert line["status"] == 499 and line["error_type"] == "client_disconnected"


def test_client_leaving_a_plain_request_cancels_the_upstream_call(gateway, keys, sim):
    sim.control(ttft_ms=5000.0)
    sock = _open_stream(gateway, keys, {"model": "small", "messages": HELLO})
    _wait_until(lambda: sim.stats()["running"] == 1)
    sock.close()
    _wait_until(lambda: sim.stats()["cancelled"] == 1 and sim.stats()["running"] == 0, timeout=3)
    line = _wait_for_log(gateway, lambda line: line.get("status") == 499 and not line["stream"])
    assert line["error_type"] == "client_disconnected"


def _wait_for_log(gateway, predicate, timeout: float = 5.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in reversed(gateway.log_lines()):
            if line.get("event") == "request" and predicate(line):
                return line
        time.sleep(0.05)
    raise AssertionError("no matching log line")


"""Anthropic's Messages API served by the gateway, used through the official ``anthropic`` SDK: plain and streamed
answers, tools in an agent's loop, count_tokens, both ways of sending a key, errors in Anthropic's shape, and the
same pipeline as chat completions behind it (ledger, limits, cache, routing)."""

from __future__ import annotations

import json

import anthropic
import pytest

from conftest import GatewayProcess, Keys, Stores, http_request, ledger_row

WEATHER = {"name": "get_weather", "description": "The weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


def sdk(gateway: GatewayProcess, key: str, **options) -> anthropic.Anthropic:
    options.setdefault("max_retries", 0)
    return anthropic.Anthropic(base_url=gateway.url, api_key=key, **options)


def test_a_message_through_the_sdk_is_answered_and_billed(gateway, keys, stores):
    client = sdk(gateway, keys.acme)
    raw = client.messages.with_raw_response.create(
        model="small", max_tokens=64, system="Be brief.",
        messages=[{"role": "user", "content": "Say hello"}])
    message = raw.parse()
    assert message.type == "message" and message.role == "assistant"
    assert message.id.startswith("msg_")
    assert message.content[0].type == "text" and message.content[0].text
    assert message.stop_reason in ("end_turn", "max_tokens")
    assert message.usage.input_tokens > 0 and message.usage.output_tokens > 0
    row = ledger_row(stores, raw.headers["x-request-id"])
    assert row["route"] == "messages" and row["status"] == 200
    assert row["prompt_tokens"] == message.usage.input_tokens
    assert row["completion_tokens"] == message.usage.output_tokens


def test_a_streamed_message_has_anthropics_events(gateway, keys):
    client = sdk(gateway, keys.acme)
    kinds = []
    with client.messages.stream(model="small", max_tokens=32,
                                messages=[{"role": "user", "content": "Count to three"}]) as stream:
        for event in stream:
            kinds.append(event.type)
        final = stream.get_final_message()
    assert kinds[0] == "message_start"
    assert "content_block_start" in kinds and "content_block_delta" in kinds and "content_block_stop" in kinds
    assert kinds[-2:] == ["message_delta", "message_stop"] or kinds[-1] == "message_stop"
    assert final.content[0].text and final.stop_reason in ("end_turn", "max_tokens")
    assert final.usage.output_tokens > 0


@pytest.mark.parametrize("stream", [False, True])
def test_an_agents_loop_calls_the_tool_then_answers(gateway, keys, stream):
    client = sdk(gateway, keys.acme)
    messages = [{"role": "user", "content": "What is the weather in Paris? Use get_weather."}]

    def ask():
        if not stream:
            return client.messages.create(model="small", max_tokens=128, tools=[WEATHER], messages=messages)
        with client.messages.stream(model="small", max_tokens=128, tools=[WEATHER], messages=messages) as events:
            return events.get_final_message()

    first = ask()
    assert first.stop_reason == "tool_use"
    call = next(block for block in first.content if block.type == "tool_use")
    assert call.name == "get_weather" and isinstance(call.input, dict) and "city" in call.input
    messages += [{"role": "assistant", "content": [block.model_dump() for block in first.content]},
                 {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                               "content": "18 degrees and sunny"}]}]
    second = ask()
    assert second.stop_reason in ("end_turn", "max_tokens")
    assert second.content[0].type == "text" and second.content[0].text


def test_tool_choice_forces_a_tool(gateway, keys):
    message = sdk(gateway, keys.acme).messages.create(
        model="small", max_tokens=128, tools=[WEATHER], tool_choice={"type": "tool", "name": "get_weather"},
        messages=[{"role": "user", "content": "hello"}])
    assert message.stop_reason == "tool_use" and message.content[-1].name == "get_weather"


def test_count_tokens(gateway, keys):
    client = sdk(gateway, keys.acme)
    short = client.messages.count_tokens(model="small", messages=[{"role": "user", "content": "hi"}])
    longer = client.messages.count_tokens(model="small", system="You are a careful assistant.", tools=[WEATHER],
                                          messages=[{"role": "user", "content": "hi " * 200}])
    assert 0 < short.input_tokens < longer.input_tokens


def test_keys_as_x_api_key_or_bearer(gateway, keys):
    by_header = sdk(gateway, keys.acme).messages.create(model="small", max_tokens=8,
                                                        messages=[{"role": "user", "content": "hi"}])
    bearer = anthropic.Anthropic(base_url=gateway.url, auth_token=keys.acme, max_retries=0)
    by_token = bearer.messages.create(model="small", max_tokens=8, messages=[{"role": "user", "content": "hi"}])
    assert by_header.content and by_token.content


def test_errors_come_in_anthropics_shape(gateway, keys):
    with pytest.raises(anthropic.AuthenticationError) as wrong_key:
        sdk(gateway, "sk-wrong").messages.create(model="small", max_tokens=8,
                                                 messages=[{"role": "user", "content": "hi"}])
    assert wrong_key.value.body["error"]["type"] == "authentication_error"
    with pytest.raises(anthropic.NotFoundError) as unknown:
        sdk(gateway, keys.acme).messages.create(model="no-such-model", max_tokens=8,
                                                messages=[{"role": "user", "content": "hi"}])
    assert unknown.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.PermissionDeniedError):
        sdk(gateway, keys.disabled).messages.create(model="small", max_tokens=8,
                                                    messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(anthropic.BadRequestError) as missing:
        sdk(gateway, keys.acme).messages.create(model="small", max_tokens=8, messages=[])
    assert "messages" in missing.value.message


@pytest.mark.parametrize("body, field", [
    ({"model": "small", "messages": [{"role": "user", "content": "hi"}]}, "max_tokens"),
    ({"model": "small", "max_tokens": "8", "messages": [{"role": "user", "content": "hi"}]}, "max_tokens"),
    ({"model": "small", "max_tokens": 8, "messages": [{"role": "system", "content": "hi"}]}, "messages.0.role"),
    ({"model": "small", "max_tokens": 8, "messages": [{"role": "user", "content": [{"type": "video"}]}]},
     "messages.0.content.0.type"),
    ({"model": "small", "max_tokens": 8, "messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    ({"model": "small", "max_tokens": 8, "system": [{"type": "image"}],
      "messages": [{"role": "user", "content": "hi"}]}, "system.0"),
    ({"model": "small", "max_tokens": 8, "tools": [{"type": "web_search_20250305", "name": "web_search"}],
      "messages": [{"role": "user", "content": "hi"}]}, "tools.0.type"),
    ({"model": "small", "max_tokens": 8, "tools": [WEATHER], "tool_choice": {"type": "tool", "name": "other"},
      "messages": [{"role": "user", "content": "hi"}]}, "tool_choice.name"),
    ({"model": "small", "max_tokens": 8, "stop_sequences": "END", "messages": [{"role": "user", "content": "hi"}]},
     "stop_sequences"),
    ({"model": "small", "max_tokens": 10**30, "messages": [{"role": "user", "content": "hi\u0000"}]}, "max_tokens"),
])
def test_malformed_fields_are_400s_naming_them(gateway, keys, body, field):
    status, answer = http_request(gateway.port, "POST", "/v1/messages", json.dumps(body).encode(),
                                  {"x-api-key": keys.acme, "anthropic-version": "2023-06-01",
                                   "content-type": "application/json"})
    assert status == 400, answer
    assert answer["type"] == "error" and answer["error"]["type"] == "invalid_request_error"
    assert field in answer["error"]["message"]


def test_a_huge_body_is_413_and_a_rate_limit_429_with_retry_after(gateway, keys):
    status, answer = http_request(gateway.port, "POST", "/v1/messages", b"{" + b" " * (30 * 1024 * 1024) + b"}",
                                  {"x-api-key": keys.acme})
    assert status == 413 and answer["error"]["type"] == "request_too_large"

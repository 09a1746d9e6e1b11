"""Anthropic's Messages API served by the gateway, used through the official ``anthropic`` SDK: plain and streamed
answers, tools in an agent's loop, count_tokens, both ways of sending a key, errors in Anthropic's shape, and the
same pipeline as chat completions behind it (ledger, limits, cache, routing)."""

from __future__ import annotations

import json

import anthropic
import pytest

from conftest import GatewayProcess, http_request, ledger_row

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


def test_system_messages_mid_conversation_and_structured_output(gateway, keys):
    """What Claude Code sends today: a system message after a user turn, ``output_config``, adaptive thinking."""
    client = sdk(gateway, keys.acme)
    message = client.messages.create(
        model="small", max_tokens=64, messages=[
            {"role": "user", "content": "Rate this film"},
            {"role": "system", "content": [{"type": "text", "text": "Answer in JSON."}]}],
        extra_body={"thinking": {"type": "adaptive"}, "context_management": {"edits": []},
                    "output_config": {"effort": "high", "format": {"type": "json_schema", "schema": {
                        "type": "object", "properties": {"score": {"type": "integer"}}, "required": ["score"],
                        "additionalProperties": False}}}})
    assert isinstance(json.loads(message.content[0].text)["score"], int)


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
    ({"model": "small", "max_tokens": 8, "messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
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


PROVIDER_KEY = "sk-provider-test-key-0123"


@pytest.fixture(scope="module")
def agents(tmp_path_factory):
    """A gateway before an Anthropic upstream (the simulator speaking Anthropic's API, with its own key) and an
    OpenAI-compatible one, with routing, a cascade, the cache on, and a tenant at 3 requests a minute."""
    from conftest import Simulator
    from gateway.config.keys import generate_key, hash_key
    import yaml

    anthropic_sim, openai_sim = Simulator("--api-key", PROVIDER_KEY), Simulator()
    config = tmp_path_factory.mktemp("agents")
    pricing = {"input_per_million": 3.0, "output_per_million": 15.0}
    models = {
        "defaults": {"timeouts": {"connect": 2, "read": 20}, "fallbacks": {"cooldown_seconds": 1},
                     "cache": {"enabled": True, "nondeterministic": True}},
        "router": {"aliases": {"auto": {}}, "classifier": {"scorer": "none"},
                   "profiles": {"default": {"simple": "gpt", "moderate": "gpt", "complex": "claude",
                                            "critical": "claude"}}},
        "models": {
            "claude": {"size": "large", "pricing": pricing, "deployments": [
                {"name": "anthropic", "provider": "anthropic", "model": "claude-sonnet-4-5",
                 "api_base": anthropic_sim.url, "api_key": "env:PROVIDER_KEY"}]},
            "claude-bad-key": {"deployments": [
                {"name": "anthropic-bad", "provider": "anthropic", "model": "claude-sonnet-4-5",
                 "api_base": anthropic_sim.url, "api_key": "env:WRONG_KEY"}]},
            "gpt": {"size": "small", "pricing": pricing, "deployments": [
                {"name": "openai-sim", "api_base": f"{openai_sim.url}/v1", "model": "gpt"}]},
        },
    }
    keys = {"main": generate_key(), "slow": generate_key()}
    tenants = {"tenants": {
        "acme": {"name": "Acme", "tier": "enterprise", "system_prompt": "You work for Acme.",
                 "keys": [{"name": "k", "sha256": hash_key(keys["main"])}]},
        "slow": {"name": "Slow", "tier": "enterprise", "limits": {"requests_per_minute": 3},
                 "keys": [{"name": "k", "sha256": hash_key(keys["slow"])}]}}}
    (config / "models.yaml").write_text(yaml.safe_dump(models))
    (config / "tenants.yaml").write_text(yaml.safe_dump(tenants))
    gateway = GatewayProcess(config, env={"PROVIDER_KEY": PROVIDER_KEY, "WRONG_KEY": "sk-wrong"})
    yield gateway, keys, anthropic_sim, openai_sim
    gateway.stop()
    anthropic_sim.stop()
    openai_sim.stop()


def test_an_anthropic_upstream_gets_the_request_as_it_came(agents, stores):
    gateway, keys, anthropic_sim, _ = agents
    client = sdk(gateway, keys["main"])
    raw = client.messages.with_raw_response.create(
        model="claude", max_tokens=40, system=[{"type": "text", "text": "Be brief.",
                                                "cache_control": {"type": "ephemeral"}}],
        thinking={"type": "enabled", "budget_tokens": 1024},
        messages=[{"role": "user", "content": "hello"}], extra_headers={"anthropic-beta": "some-beta-2025"})
    message = raw.parse()
    sent = anthropic_sim.last_request()
    assert sent["model"] == "claude-sonnet-4-5"  # the upstream's name for it
    assert sent["thinking"] == {"type": "enabled", "budget_tokens": 1024}  # what the gateway does not model survives
    assert sent["system"][0] == {"type": "text", "text": "You work for Acme."}  # the tenant's prompt first
    assert sent["system"][1]["cache_control"] == {"type": "ephemeral"}
    assert message.content[0].text and message.usage.output_tokens > 0
    row = ledger_row(stores, raw.headers["x-request-id"])
    assert row["route"] == "messages" and row["model"] == "claude"
    assert row["prompt_tokens"] == message.usage.input_tokens
    assert row["completion_tokens"] == message.usage.output_tokens
    assert float(row["cost_usd"]) > 0
    with client.messages.stream(model="claude", max_tokens=12, messages=[{"role": "user", "content": "hi"}]) as s:
        streamed = s.get_final_message()
    assert streamed.usage.output_tokens == 12 and streamed.content[0].text


def test_an_agents_loop_against_the_anthropic_upstream(agents):
    gateway, keys, _, _ = agents
    client = sdk(gateway, keys["main"])
    messages = [{"role": "user", "content": "What is the weather in Paris? Use get_weather."}]
    first = client.messages.create(model="claude", max_tokens=128, tools=[WEATHER], messages=messages)
    call = next(block for block in first.content if block.type == "tool_use")
    assert first.stop_reason == "tool_use" and call.name == "get_weather"
    messages += [{"role": "assistant", "content": [block.model_dump() for block in first.content]},
                 {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "sunny"}]}]
    second = client.messages.create(model="claude", max_tokens=64, tools=[WEATHER], messages=messages)
    assert second.stop_reason in ("end_turn", "max_tokens") and second.content[0].type == "text"


def test_auto_routes_messages_and_the_cache_answers_repeats(agents, stores):
    gateway, keys, _, openai_sim = agents
    client = sdk(gateway, keys["main"])
    ask = {"model": "auto", "max_tokens": 20, "messages": [{"role": "user", "content": "What is 2 + 2, briefly?"}]}
    first = client.messages.with_raw_response.create(**ask)
    assert first.headers["x-gateway-model"] == "gpt" and first.headers["x-gateway-routing-rule"]
    again = client.messages.with_raw_response.create(**ask)
    assert again.headers["x-gateway-cache"] == "hit"
    assert again.parse().content[0].text == first.parse().content[0].text
    row = ledger_row(stores, again.headers["x-request-id"])
    assert row["route"] == "messages" and row["cache_hit"] is True
    streamed = client.messages.with_raw_response.create(**ask, stream=True)  # a stream is a request of its own
    assert "".join(e.delta.text for e in streamed.parse() if e.type == "content_block_delta")


def test_limits_and_upstream_failures_in_anthropics_terms(agents):
    gateway, keys, anthropic_sim, openai_sim = agents
    slow = sdk(gateway, keys["slow"])
    for _ in range(3):
        slow.messages.create(model="gpt", max_tokens=4, messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(anthropic.RateLimitError) as limited:
        slow.messages.create(model="gpt", max_tokens=4, messages=[{"role": "user", "content": "hi"}])
    assert limited.value.body["error"]["type"] == "rate_limit_error"
    assert int(limited.value.response.headers["retry-after"]) > 0
    client = sdk(gateway, keys["main"])
    with pytest.raises(anthropic.APIStatusError) as refused:
        client.messages.create(model="claude-bad-key", max_tokens=4, messages=[{"role": "user", "content": "hi"}])
    assert refused.value.status_code == 502 and refused.value.body["error"]["type"] == "api_error"
    assert PROVIDER_KEY not in str(refused.value.body) and "sk-wrong" not in str(refused.value.body)
    openai_sim.control(error_rate=1.0, error_status=503)
    try:
        with pytest.raises(anthropic.APIStatusError) as overloaded:
            client.messages.create(model="gpt", max_tokens=4, messages=[{"role": "user", "content": "busy?"}])
        assert overloaded.value.status_code == 529 and overloaded.value.body["error"]["type"] == "overloaded_error"
    finally:
        openai_sim.control(error_rate=0.0)


@pytest.mark.parametrize("model", ["gpt", "claude"])
def test_a_stream_that_breaks_ends_with_an_error_event(agents, model):
    gateway, keys, anthropic_sim, openai_sim = agents
    sim = anthropic_sim if model == "claude" else openai_sim
    sim.control(break_stream_after=3)
    try:
        client = sdk(gateway, keys["main"])
        with pytest.raises(anthropic.APIStatusError) as broken:
            with client.messages.stream(model=model, max_tokens=50,
                                        messages=[{"role": "user", "content": f"tell me a story {model}"}]) as s:
                for _ in s:
                    pass
        assert "incomplete" in str(broken.value.body) or "stream" in str(broken.value.body)
    finally:
        sim.control(break_stream_after=None)


def test_the_cache_tells_apart_what_only_an_anthropic_upstream_reads(agents):
    gateway, keys, anthropic_sim, _ = agents
    client = sdk(gateway, keys["main"])
    ask = {"model": "claude", "max_tokens": 16, "messages": [{"role": "user", "content": "Hi!"}]}
    client.messages.create(**ask)
    assert client.messages.with_raw_response.create(**ask).headers["x-gateway-cache"] == "hit"
    thinking = client.messages.with_raw_response.create(**ask, thinking={"type": "enabled", "budget_tokens": 1024})
    assert thinking.headers["x-gateway-cache"] == "miss"  # another question for the upstream
    beta = client.messages.with_raw_response.create(**ask, extra_headers={"anthropic-beta": "another-beta"})
    assert beta.headers["x-gateway-cache"] == "miss"
    with_metadata = client.messages.with_raw_response.create(**ask, metadata={"user_id": "someone"})
    assert with_metadata.headers["x-gateway-cache"] == "hit"  # who asks does not change the answer

"""Anthropic and Gemini on the gateway's own path: chat completions translated into each provider's API, sent on the
pooled HTTP client, and the answers translated back. The simulator speaks both APIs and keeps the bodies it got,
so the tests read what went over the wire; the clients are the official openai SDK's."""

from __future__ import annotations

import json

import openai
import pytest
import yaml

from conftest import GatewayProcess, Simulator, http_request, ledger_row
from gateway.config.keys import generate_key, hash_key

PROVIDER_KEY = "sk-provider-translated-0123"
PIXEL = ("data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQ"
         "AAAABJRU5ErkJggg==")
WEATHER = {"type": "function", "function": {"name": "weather", "description": "The weather in a city.",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}


@pytest.fixture(scope="module")
def spoken(tmp_path_factory):
    sim = Simulator("--api-key", PROVIDER_KEY)
    config = tmp_path_factory.mktemp("spoken")
    key = generate_key()
    pricing = {"input_per_million": 3.0, "output_per_million": 15.0}
    models = {"models": {
        "claude": {"pricing": pricing, "deployments": [
            {"name": "anthropic", "provider": "anthropic", "model": "claude-sonnet-4-5", "api_base": sim.url,
             "api_key": "env:PROVIDER_KEY"}]},
        "gemini": {"pricing": pricing, "deployments": [
            {"name": "gemini", "provider": "gemini", "model": "gemini-2.5-flash", "api_base": f"{sim.url}/v1beta",
             "api_key": "env:PROVIDER_KEY"}]}}}
    (config / "models.yaml").write_text(yaml.safe_dump(models))
    (config / "tenants.yaml").write_text(yaml.safe_dump({"tenants": {"acme": {
        "name": "Acme", "tier": "enterprise", "keys": [{"name": "k", "sha256": hash_key(key)}]}}}))
    gateway = GatewayProcess(config, env={"PROVIDER_KEY": PROVIDER_KEY})
    try:
        yield gateway, gateway.client(key), sim
    finally:
        gateway.stop()
        sim.stop()


def conversation() -> list[dict]:
    return [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": [{"type": "text", "text": "What is the weather in both cities?"},
                                     {"type": "image_url", "image_url": {"url": PIXEL}}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}},
            {"id": "call_2", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Rome"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "rain"},
        {"role": "tool", "tool_call_id": "call_2", "content": '{"sky": "clear"}'},
        {"role": "user", "content": "Sum it up."},
    ]


def test_litellm_is_not_loaded_for_providers_the_gateway_speaks(spoken):
    gateway, client, _ = spoken
    assert client.chat.completions.create(model="claude", messages=[{"role": "user", "content": "hi"}]).choices
    assert not any("LiteLLM loaded" in line.get("message", "") for line in gateway.log_lines())


def test_a_conversation_with_tools_goes_to_anthropic_in_its_own_api(spoken, stores):
    _, client, sim = spoken
    raw = client.chat.completions.with_raw_response.create(
        model="claude", messages=conversation(), tools=[WEATHER], tool_choice="auto", parallel_tool_calls=False,
        stop=["END"], temperature=0.2, top_p=0.9, max_completion_tokens=9, user="user-7", logprobs=True, seed=3)
    answer = raw.parse()
    assert answer.object == "chat.completion" and answer.choices[0].finish_reason == "tool_calls"
    assert answer.choices[0].message.tool_calls[0].function.name == "weather"
    assert answer.usage.completion_tokens > 0 and answer.usage.prompt_tokens > 0
    assert float(ledger_row(stores, raw.headers["x-request-id"])["cost_usd"]) > 0
    sent = sim.last_request()
    assert sent["model"] == "claude-sonnet-4-5" and sent["system"] == "You are terse."
    assert [m["role"] for m in sent["messages"]] == ["user", "assistant", "user"]  # turns alternate
    first, calls, results = (m["content"] for m in sent["messages"])
    assert first[1] == {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                    "data": PIXEL.split(",", 1)[1]}}
    assert [c["input"] for c in calls] == [{"city": "Oslo"}, {"city": "Rome"}] and calls[0]["type"] == "tool_use"
    assert [r.get("tool_use_id") for r in results] == ["call_1", "call_2", None]
    assert results[2] == {"type": "text", "text": "Sum it up."}
    assert sent["tools"][0]["input_schema"]["required"] == ["city"]
    assert sent["tool_choice"] == {"type": "auto", "disable_parallel_tool_use": True}
    assert sent["stop_sequences"] == ["END"] and sent["max_tokens"] == 9 and sent["metadata"] == {"user_id": "user-7"}
    assert "logprobs" not in sent and "seed" not in sent and "stream_options" not in sent


def test_a_conversation_with_tools_goes_to_gemini_in_its_own_api(spoken):
    _, client, sim = spoken
    answer = client.chat.completions.create(
        model="gemini", messages=conversation(), tools=[WEATHER], tool_choice={"type": "function",
                                                                             "function": {"name": "weather"}},
        stop="END", temperature=0.2, max_tokens=20, seed=3)
    call = answer.choices[0].message.tool_calls[0]
    assert json.loads(call.function.arguments) == {"city": call and json.loads(call.function.arguments)["city"]}
    assert answer.choices[0].finish_reason == "tool_calls"
    sent = sim.last_request()
    assert sent["systemInstruction"] == {"parts": [{"text": "You are terse."}]}
    assert [c["role"] for c in sent["contents"]] == ["user", "model", "user"]
    first, calls, results = (c["parts"] for c in sent["contents"])
    assert first[1] == {"inlineData": {"mimeType": "image/png", "data": PIXEL.split(",", 1)[1]}}
    assert [p["functionCall"] for p in calls] == [{"name": "weather", "args": {"city": "Oslo"}},
                                                  {"name": "weather", "args": {"city": "Rome"}}]
    assert results[:2] == [{"functionResponse": {"name": "weather", "response": {"result": "rain"}}},
                           {"functionResponse": {"name": "weather", "response": {"sky": "clear"}}}]
    assert sent["generationConfig"] == {"maxOutputTokens": 20, "temperature": 0.2, "seed": 3, "stopSequences": ["END"]}
    assert sent["toolConfig"] == {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["weather"]}}
    assert sent["tools"][0]["functionDeclarations"][0]["parametersJsonSchema"] == WEATHER["function"]["parameters"]


def test_a_gemini_calls_thought_signature_goes_back_with_it(spoken):
    _, client, sim = spoken
    ask = [{"role": "user", "content": "weather in Oslo?"}]
    called = client.chat.completions.create(model="gemini", messages=ask, tools=[WEATHER], tool_choice="required")
    call = called.choices[0].message.tool_calls[0]
    follow = ask + [called.choices[0].message.model_dump(exclude_none=True),
                    {"role": "tool", "tool_call_id": call.id, "content": "rain"}]
    assert client.chat.completions.create(model="gemini", messages=follow, tools=[WEATHER]).choices[0].message
    part = sim.last_request()["contents"][1]["parts"][0]
    assert part["thoughtSignature"] == "c2ltLXNpZ25hdHVyZQ==" and part["functionCall"]["name"] == "weather"
    assert sim.last_request()["contents"][2]["parts"][0]["functionResponse"]["name"] == "weather"


@pytest.mark.parametrize("model", ["claude", "gemini"])
def test_streamed_tool_calls_and_usage_read_as_openais(spoken, model):
    _, client, _ = spoken
    chunks = list(client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Oslo?"}],
                                                 tools=[WEATHER], tool_choice="required", stream=True,
                                                 stream_options={"include_usage": True}))
    pieces = [c.choices[0].delta.tool_calls for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    name = "".join(p[0].function.name or "" for p in pieces)
    arguments = "".join(p[0].function.arguments or "" for p in pieces)
    assert name == "weather" and isinstance(json.loads(arguments), dict) and pieces[0][0].id
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage.completion_tokens > 0 and chunks[-1].usage.prompt_tokens > 0 and not chunks[-1].choices
    plain = list(client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=6, stream=True))
    assert all(c.usage is None for c in plain) and "".join(c.choices[0].delta.content or "" for c in plain if c.choices)


@pytest.mark.parametrize("model", ["claude", "gemini"])
@pytest.mark.parametrize("stream", [False, True])
def test_json_answers_through_each_provider(spoken, model, stream):
    _, client, sim = spoken
    asked = dict(model=model, messages=[{"role": "user", "content": "a JSON object, please"}],
                 response_format={"type": "json_object"})
    if stream:
        text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**asked, stream=True)
                       if c.choices)
    else:
        answer = client.chat.completions.create(**asked)
        text = answer.choices[0].message.content
        assert answer.choices[0].finish_reason == "stop" and not answer.choices[0].message.tool_calls
    assert isinstance(json.loads(text), dict)
    sent = sim.last_request()
    if model == "claude":  # asked through one forced tool, whose input is the answer
        assert sent["tool_choice"] == {"type": "tool", "name": "json_answer"}
    else:
        assert sent["generationConfig"]["responseMimeType"] == "application/json"


def test_a_schema_goes_as_anthropics_structured_output_without_what_it_cannot_enforce(spoken):
    _, client, sim = spoken
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 5},
                                               "tags": {"type": "array", "items": {"type": "string"},
                                                        "minItems": 2}},
              "required": ["name", "tags"], "additionalProperties": False}
    answer = client.chat.completions.create(model="claude", messages=[{"role": "user", "content": "x"}],
                                            response_format={"type": "json_schema",
                                                             "json_schema": {"name": "t", "schema": schema}})
    assert set(json.loads(answer.choices[0].message.content)) == {"name", "tags"}
    sent = sim.last_request()["output_config"]["format"]
    assert sent["type"] == "json_schema" and "maxLength" not in json.dumps(sent) and "minItems" not in json.dumps(sent)


def test_requests_a_provider_cannot_carry_are_400s_naming_the_field(spoken):
    gateway, client, _ = spoken
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="claude", messages=[{"role": "user", "content": "hi"}], n=2)
    assert caught.value.code == "unsupported_by_provider" and caught.value.param == "n"
    audio = [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]}]
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="claude", messages=audio)
    assert caught.value.param == "messages.0.content.0.type"
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="gemini", prompt="Once upon a time")
    assert "/v1/chat/completions" in caught.value.message


@pytest.mark.parametrize("model", ["claude", "gemini"])
def test_a_providers_error_keeps_its_status_and_message(spoken, model):
    _, client, sim = spoken
    sim.control(error_rate=1.0, error_status=400)
    try:
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])
    finally:
        sim.control(error_rate=0.0)
    provider = "anthropic" if model == "claude" else "gemini"
    assert caught.value.body["message"].startswith(f"{provider}: simulated") and caught.value.type == "invalid_request_error"


@pytest.mark.parametrize("model", ["claude", "gemini"])
def test_a_stream_that_breaks_off_ends_in_an_error_event(spoken, model):
    gateway, client, sim = spoken
    sim.control(break_stream_after=3)
    try:
        status, body = http_request(gateway.port, "POST", "/v1/chat/completions",
                                    json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}],
                                                "max_tokens": 20, "stream": True}).encode(),
                                    {"Authorization": f"Bearer {client.api_key}", "Content-Type": "application/json"})
    finally:
        sim.control(break_stream_after=None)
    assert status == 200 and b"upstream_broken" in body and b"[DONE]" not in body

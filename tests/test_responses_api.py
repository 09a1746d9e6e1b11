"""OpenAI's Responses API served by the gateway, used through the official ``openai`` SDK's ``responses``: plain and
streamed answers, function tools in an agent's loop, stored responses (retrieve, delete, input items,
``previous_response_id``), tenants kept apart, and bad input."""

from __future__ import annotations

import json
import time

import openai
import pytest

from conftest import http_request, ledger_row

WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


def test_a_response_through_the_sdk_is_answered_stored_and_billed(gateway, keys, stores):
    client = gateway.client(keys.acme)
    raw = client.responses.with_raw_response.create(model="small", input="Say hello", instructions="Be brief.",
                                                    metadata={"case": "plain"})
    response = raw.parse()
    assert response.object == "response" and response.status == "completed" and response.id.startswith("resp_")
    assert response.output_text
    assert response.output[0].type == "message" and response.output[0].content[0].type == "output_text"
    assert response.usage.input_tokens > 0 and response.usage.output_tokens > 0
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens
    assert response.instructions == "Be brief." and response.metadata == {"case": "plain"}
    row = ledger_row(stores, raw.headers["x-request-id"])
    assert row["route"] == "responses" and row["status"] == 200
    assert row["completion_tokens"] == response.usage.output_tokens
    again = client.responses.retrieve(response.id)
    assert again.id == response.id and again.output_text == response.output_text
    items = client.responses.input_items.list(response.id)
    assert [item.type for item in items.data] == ["message"] and items.data[0].content[0].text == "Say hello"


def test_a_streamed_response_has_the_semantic_events(gateway, keys):
    client = gateway.client(keys.acme)
    kinds, text = [], ""
    with client.responses.stream(model="small", input="Count to three") as stream:
        for event in stream:
            kinds.append(event.type)
            if event.type == "response.output_text.delta":
                text += event.delta
        final = stream.get_final_response()
    assert kinds[:2] == ["response.created", "response.in_progress"]
    for kind in ("response.output_item.added", "response.content_part.added", "response.output_text.delta",
                 "response.output_text.done", "response.content_part.done", "response.output_item.done"):
        assert kind in kinds
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert final.output_text == text and final.usage.output_tokens > 0
    assert client.responses.retrieve(final.id).output_text == text


@pytest.mark.parametrize("stream", [False, True])
def test_an_agents_loop_with_a_function_tool_and_previous_response_id(gateway, keys, stream):
    client = gateway.client(keys.acme)

    def create(**fields):
        if not stream:
            return client.responses.create(model="small", tools=[WEATHER], **fields)
        with client.responses.stream(model="small", tools=[WEATHER], **fields) as events:
            kinds = [event.type for event in events]
            final = events.get_final_response()
        if final.output[0].type == "function_call":
            assert "response.function_call_arguments.delta" in kinds
            assert "response.function_call_arguments.done" in kinds
        return final

    first = create(input="What is the weather in Paris? Use get_weather.")
    call = first.output[0]
    assert call.type == "function_call" and call.name == "get_weather"
    assert "city" in json.loads(call.arguments)
    second = create(previous_response_id=first.id,
                    input=[{"type": "function_call_output", "call_id": call.call_id, "output": "18 degrees"}])
    assert second.output[0].type == "message" and second.output_text
    assert second.previous_response_id == first.id


def test_a_whole_conversation_sent_again_without_storage(gateway, keys):
    client = gateway.client(keys.acme)
    first = client.responses.create(model="small", tools=[WEATHER], store=False,
                                    input=[{"role": "user", "content": "Weather in Oslo? Use get_weather."}])
    assert first.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)
    call = first.output[0]
    second = client.responses.create(model="small", tools=[WEATHER], store=False, input=[
        {"role": "user", "content": "Weather in Oslo? Use get_weather."},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "cold"}])
    assert second.output[0].type == "message"


def test_structured_output_with_text_format(gateway, keys):
    schema = {"type": "object", "properties": {"title": {"type": "string"}, "score": {"type": "integer"}},
              "required": ["title", "score"], "additionalProperties": False}
    response = gateway.client(keys.acme).responses.create(
        model="small", input="Rate this film", text={"format": {"type": "json_schema", "name": "rating",
                                                                "schema": schema, "strict": True}})
    parsed = json.loads(response.output_text)
    assert isinstance(parsed["title"], str) and isinstance(parsed["score"], int)


def test_stored_responses_are_the_tenants_own_and_deleted_for_good(gateway, keys):
    acme = gateway.client(keys.acme)
    response = acme.responses.create(model="small", input="remember this")
    other = gateway.client(keys.limited)
    with pytest.raises(openai.NotFoundError):
        other.responses.retrieve(response.id)
    with pytest.raises(openai.NotFoundError):
        other.responses.delete(response.id)
    with pytest.raises(openai.NotFoundError):
        other.responses.create(model="small", input="and?", previous_response_id=response.id)
    with pytest.raises(openai.NotFoundError):
        other.responses.input_items.list(response.id)
    assert acme.responses.retrieve(response.id).id == response.id  # the other tenant's tries changed nothing
    acme.responses.delete(response.id)
    with pytest.raises(openai.NotFoundError):
        acme.responses.retrieve(response.id)
    with pytest.raises(openai.NotFoundError):
        acme.responses.create(model="small", input="and?", previous_response_id=response.id)
    with pytest.raises(openai.NotFoundError):
        acme.responses.delete(response.id)


def test_built_in_tools_are_refused_naming_them(gateway, keys):
    with pytest.raises(openai.BadRequestError) as refused:
        gateway.client(keys.acme).responses.create(model="small", input="news?", tools=[{"type": "web_search"}])
    assert "web_search" in refused.value.message and refused.value.body["param"] == "tools[0].type"


@pytest.mark.parametrize("body, param", [
    ({"model": "small"}, "input"),
    ({"model": "small", "input": 5}, "input"),
    ({"model": "small", "input": [{"role": "robot", "content": "hi"}]}, "input[0].role"),
    ({"model": "small", "input": [{"type": "function_call_output", "output": "x"}]}, "input[0].call_id"),
    ({"model": "small", "input": [{"role": "user", "content": [{"type": "input_audio"}]}]},
     "input[0].content[0].type"),
    ({"model": "small", "input": "hi", "max_output_tokens": 0}, "max_output_tokens"),
    ({"model": "small", "input": "hi", "max_output_tokens": 10**30}, None),
    ({"model": "small", "input": "hi", "temperature": "hot"}, "temperature"),
    ({"model": "small", "input": "hi", "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice.name"),
    ({"model": "small", "input": "hi", "text": {"format": {"type": "json_schema", "schema": {}}}},
     "text.format.name"),
    ({"model": "small", "input": "hi", "metadata": {"k": 5}}, "metadata"),
    ({"model": "small", "input": "hi", "background": True}, "background"),
    ({"model": "small", "input": "hi\u0000", "stream": "yes"}, "stream"),
    ({"model": "small", "input": "hi", "previous_response_id": 7}, "previous_response_id"),
])
def test_malformed_fields_are_400s_naming_them(gateway, keys, body, param):
    status, answer = http_request(gateway.port, "POST", "/v1/responses", json.dumps(body).encode(),
                                  {"authorization": f"Bearer {keys.acme}", "content-type": "application/json"})
    assert status == 400, answer
    assert answer["error"]["type"] == "invalid_request_error"
    if param is not None:
        assert answer["error"]["param"] == param


def test_an_unknown_previous_response_is_a_404(gateway, keys):
    with pytest.raises(openai.NotFoundError) as unknown:
        gateway.client(keys.acme).responses.create(model="small", input="hi", previous_response_id="resp_nope")
    assert unknown.value.body["param"] == "previous_response_id"


@pytest.fixture(scope="module")
def upstreams(tmp_path_factory):
    """A gateway before an upstream that serves the Responses API (the simulator, as vLLM does) and a tenant with a
    system prompt; the same model's second deployment speaks only chat completions."""
    from conftest import GatewayProcess, Simulator
    from gateway.config.keys import generate_key, hash_key
    import yaml

    sim = Simulator()
    config = tmp_path_factory.mktemp("responses-upstream")
    pricing = {"input_per_million": 1.0, "output_per_million": 2.0}
    models = {"defaults": {"timeouts": {"connect": 2, "read": 20}, "fallbacks": {"cooldown_seconds": 30}},
              "models": {
                  "native": {"pricing": pricing, "deployments": [
                      {"name": "serves-responses", "api_base": f"{sim.url}/v1", "model": "vllm-model",
                       "apis": ["responses"]}]},
                  "mixed": {"pricing": pricing, "deployments": [
                      {"name": "chat-only", "api_base": f"{sim.url}/v1", "model": "chat-model"}]}}}
    key = generate_key()
    tenants = {"tenants": {"acme": {"name": "Acme", "tier": "enterprise", "system_prompt": "You work for Acme.",
                                    "keys": [{"name": "k", "sha256": hash_key(key)}]}}}
    (config / "models.yaml").write_text(yaml.safe_dump(models))
    (config / "tenants.yaml").write_text(yaml.safe_dump(tenants))
    gateway = GatewayProcess(config)
    yield gateway, gateway.client(key), sim
    gateway.stop()
    sim.stop()


@pytest.mark.parametrize("stream", [False, True])
def test_an_upstream_that_serves_responses_gets_the_request_as_it_came(upstreams, stores, stream):
    gateway, client, sim = upstreams

    def create(**fields):
        if not stream:
            raw = client.responses.with_raw_response.create(model="native", tools=[WEATHER], **fields)
            return raw.parse(), raw.headers["x-request-id"]
        with client.responses.stream(model="native", tools=[WEATHER], **fields) as events:
            return events.get_final_response(), None

    first, request_id = create(input="Weather in Rome? Use get_weather.", reasoning={"effort": "low"},
                               include=["reasoning.encrypted_content"], instructions="Be brief.")
    sent = sim.last_request()
    assert sent["model"] == "vllm-model" and sent["store"] is False
    assert sent["reasoning"] == {"effort": "low"} and sent["include"] == ["reasoning.encrypted_content"]
    assert sent["instructions"] == "You work for Acme.\n\nBe brief."
    call = first.output[0]
    assert call.type == "function_call" and first.store is True and first.instructions == "Be brief."
    if request_id is not None:
        row = ledger_row(stores, request_id)
        assert row["route"] == "responses" and row["prompt_tokens"] == first.usage.input_tokens > 0
        assert row["completion_tokens"] == first.usage.output_tokens > 0
    assert client.responses.retrieve(first.id).output[0].call_id == call.call_id  # stored by the gateway
    second, _ = create(previous_response_id=first.id,
                       input=[{"type": "function_call_output", "call_id": call.call_id, "output": "warm"}])
    sent = sim.last_request()
    assert "previous_response_id" not in sent  # the upstream keeps nothing: the conversation is sent whole
    assert [item.get("type", "message") for item in sent["input"]] == ["message", "function_call",
                                                                      "function_call_output"]
    assert second.output[0].type == "message" and second.previous_response_id == first.id
    assert client.responses.retrieve(second.id).output_text == second.output_text


@pytest.mark.parametrize("streamed", [False, True])
def test_an_openai_agents_sdk_agent_runs_its_tool_through_the_gateway(gateway, keys, stores, streamed):
    import asyncio

    from agents import Agent, OpenAIResponsesModel, Runner, function_tool, set_tracing_disabled

    set_tracing_disabled(True)  # traces would go to OpenAI's servers
    calls = []

    @function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        calls.append(city)
        return f"It is 18 degrees in {city}."

    model = OpenAIResponsesModel(model="small", openai_client=openai.AsyncOpenAI(
        base_url=f"{gateway.url}/v1", api_key=keys.acme, max_retries=0))
    agent = Agent(name="Forecaster", instructions="Answer with the weather tool.", tools=[get_weather], model=model)

    async def run():
        if not streamed:
            return await Runner.run(agent, "What is the weather in Paris? Use get_weather.")
        result = Runner.run_streamed(agent, "What is the weather in Paris? Use get_weather.")
        async for _ in result.stream_events():
            pass
        return result

    result = asyncio.run(run())
    assert len(calls) == 1 and isinstance(calls[0], str)
    assert isinstance(result.final_output, str) and result.final_output
    assert [item.type for item in result.new_items] == ["tool_call_item", "tool_call_output_item",
                                                       "message_output_item"]


def test_namespaced_functions_are_offered_and_called_with_their_namespace(gateway, keys):
    """As Codex CLI offers its sub-agent tools: a namespace of functions."""
    client = gateway.client(keys.acme)
    namespace = {"type": "namespace", "name": "weather_v1", "description": "Weather tools",
                 "tools": [{k: v for k, v in WEATHER.items()}]}
    first = client.responses.create(model="small", tools=[namespace], input="Weather in Lima? Use get_weather.")
    call = first.output[0]
    assert call.type == "function_call" and call.name == "get_weather" and call.namespace == "weather_v1"
    second = client.responses.create(model="small", tools=[namespace], previous_response_id=first.id,
                                     input=[{"type": "function_call_output", "call_id": call.call_id,
                                             "output": "mild"}])
    assert second.output[0].type == "message"
    with pytest.raises(openai.BadRequestError) as twice:
        client.responses.create(model="small", tools=[namespace, WEATHER], input="hi")
    assert "get_weather" in twice.value.message


def test_a_cached_answer_of_a_native_upstream_is_a_new_response(upstreams):
    gateway, client, sim = upstreams
    first = client.responses.with_raw_response.create(model="native", input="the same question", temperature=0)
    again = client.responses.with_raw_response.create(model="native", input="the same question", temperature=0)
    assert again.headers["x-gateway-cache"] == "hit"
    one, two = first.parse(), again.parse()
    assert one.id != two.id and one.output_text == two.output_text
    assert client.responses.retrieve(one.id).id == one.id and client.responses.retrieve(two.id).id == two.id


def test_a_stream_that_breaks_ends_with_error_and_response_failed(gateway, keys, sim):
    sim.control(break_stream_after=3)
    try:
        with gateway.client(keys.acme).responses.stream(model="small", input="tell me a long story") as stream:
            events = list(stream)
        kinds = [event.type for event in events]
        assert "response.output_text.delta" in kinds
        assert kinds[-2:] == ["error", "response.failed"]  # as OpenAI ends a stream that fails
        assert "incomplete" in events[-2].message and events[-1].response.status == "failed"
    finally:
        sim.control(break_stream_after=None)


def test_nul_bytes_and_deep_input_are_kept_or_refused_cleanly(gateway, keys):
    client = gateway.client(keys.acme)
    response = client.responses.create(model="small", input="a\u0000b")
    assert client.responses.retrieve(response.id).id == response.id  # stored although jsonb refuses NUL
    assert client.responses.input_items.list(response.id).data[0].content[0].text == "a\u0000b"
    deep: object = "x"
    for _ in range(300):
        deep = [deep]
    status, answer = http_request(gateway.port, "POST", "/v1/responses", json.dumps(
        {"model": "small", "input": [{"role": "user", "content": [{"type": "input_text", "text": "hi"}]}],
         "metadata": {"k": "v"}, "text": {"format": {"type": "json_schema", "name": "n", "schema": {"d": deep}}}}
    ).encode(), {"authorization": f"Bearer {keys.acme}", "content-type": "application/json"})
    assert status == 400 and answer["error"]["code"] in ("nesting_too_deep", "invalid_json"), answer


def test_without_postgresql_responses_are_answered_unstored_and_reads_are_503s(upstreams, stores):
    gateway, client, _ = upstreams
    kept = client.responses.create(model="mixed", input="before the outage")
    stores.stop_postgres()
    try:
        answered = client.responses.create(model="mixed", input="during the outage")
        assert answered.output_text and answered.store is False  # said, not pretended
        for call in (lambda: client.responses.retrieve(kept.id),
                     lambda: client.responses.create(model="mixed", input="and?", previous_response_id=kept.id)):
            with pytest.raises(openai.InternalServerError) as away:
                call()
            assert away.value.status_code == 503 and away.value.code == "store_unavailable"
    finally:
        stores.start_postgres()
    deadline = time.monotonic() + 15
    while True:  # saves are refused for a few seconds after a failure, then tried again
        again = client.responses.create(model="mixed", input="after the outage")
        if again.store or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert again.store is True and client.responses.retrieve(again.id).id == again.id
    assert client.responses.retrieve(kept.id).id == kept.id

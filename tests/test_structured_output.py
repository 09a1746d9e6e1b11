"""Structured output through the gateway, with the clients people use for it: the openai SDK's parse(),
LangChain's with_structured_output and LlamaIndex's as_structured_llm, plain and streamed."""

from __future__ import annotations

import json
from enum import Enum

import pytest
from pydantic import BaseModel, Field


class Priority(str, Enum):
    LOW = "low"
    HIGH = "high"


class Step(BaseModel):
    title: str
    minutes: int = Field(ge=1, le=120)


class Plan(BaseModel):
    """A plan for the incident."""

    summary: str
    priority: Priority
    owner_email: str | None
    steps: list[Step]
    confident: bool


SCHEMA_CHECK = Plan.model_validate_json
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")


def test_openai_sdk_parse_whole_and_streamed(gateway, keys):
    client = gateway.client(keys.acme)
    messages = [{"role": "user", "content": "Plan the response to the outage"}]
    parsed = client.chat.completions.parse(model="small", messages=messages, response_format=Plan)
    plan = parsed.choices[0].message.parsed
    assert isinstance(plan, Plan) and plan.steps
    with client.chat.completions.stream(model="small", messages=messages, response_format=Plan) as stream:
        deltas = [event for event in stream if event.type == "content.delta"]
        final = stream.get_final_completion()
    assert len(deltas) > 3  # the JSON came in pieces
    assert final.choices[0].message.parsed == plan  # the same question gets the same answer


def test_openai_sdk_tool_arguments_follow_the_tool_schema(gateway, keys):
    import openai

    client = gateway.client(keys.acme)
    tool = openai.pydantic_function_tool(Plan, name="make_plan")
    completion = client.chat.completions.parse(
        model="small", messages=[{"role": "user", "content": "Make a plan"}], tools=[tool],
        tool_choice={"type": "function", "function": {"name": "make_plan"}})
    call = completion.choices[0].message.tool_calls[0]
    assert call.function.name == "make_plan" and isinstance(call.function.parsed_arguments, Plan)
    stream = client.chat.completions.create(
        model="small", messages=[{"role": "user", "content": "Make a plan"}], tools=[tool], stream=True,
        tool_choice="required")
    arguments = "".join(chunk.choices[0].delta.tool_calls[0].function.arguments or ""
                        for chunk in stream if chunk.choices and chunk.choices[0].delta.tool_calls)
    SCHEMA_CHECK(arguments)  # streamed tool-call arguments put together are valid JSON for the schema


def test_json_object_mode_is_json_streamed_too(gateway, keys):
    client = gateway.client(keys.acme)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
        model="small", messages=[{"role": "user", "content": "json please"}], stream=True,
        response_format={"type": "json_object"}) if chunk.choices)
    assert isinstance(json.loads(text), dict)


def test_langchain_with_structured_output(gateway, keys):
    langchain_openai = pytest.importorskip("langchain_openai")
    model = langchain_openai.ChatOpenAI(model="small", base_url=f"{gateway.url}/v1", api_key=keys.acme,
                                        max_retries=0, timeout=30)
    for method in ("json_schema", "function_calling"):
        structured = model.with_structured_output(Plan, method=method)
        assert isinstance(structured.invoke("Plan the response to the outage"), Plan), method
    streamed = list(model.with_structured_output(Plan).stream("Plan the response to the outage"))
    assert isinstance(streamed[-1], Plan)
    # JSON mode: the prompt carries the schema, and the answer follows it (it was always {"answer": ...})
    json_mode = model.with_structured_output(Plan, method="json_mode")
    schema = json.dumps(Plan.model_json_schema())
    assert isinstance(json_mode.invoke(f"Plan the response to the outage. Answer in JSON with this schema: {schema}"),
                      Plan)
    keys_named = model.with_structured_output(method="json_mode").invoke(
        "Tell me a joke. Answer in JSON with the keys 'setup' and 'punchline'.")
    assert set(keys_named) == {"setup", "punchline"}


def test_llamaindex_as_structured_llm(gateway, keys):
    openai_like = pytest.importorskip("llama_index.llms.openai_like")
    from llama_index.core.llms import ChatMessage

    llm = openai_like.OpenAILike(model="small", api_base=f"{gateway.url}/v1", api_key=keys.acme,
                                 is_chat_model=True, is_function_calling_model=True, max_retries=0, timeout=30)
    structured = llm.as_structured_llm(Plan)
    answer = structured.chat([ChatMessage(role="user", content="Plan the response to the outage")])
    assert isinstance(answer.raw, Plan)
    streamed = list(structured.stream_chat([ChatMessage(role="user", content="Plan the response to the outage")]))
    assert isinstance(streamed[-1].raw, Plan)

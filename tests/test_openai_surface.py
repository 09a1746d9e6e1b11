"""The OpenAI surface as the official SDK uses it: chat, streams, completions, embeddings, models."""

from __future__ import annotations

import base64
import struct
import time

import openai
import pytest

from conftest import http_request


def test_chat_answers_with_usage_and_says_what_the_gateway_did(gateway, client, sim):
    raw = client.chat.completions.with_raw_response.create(
        model="small", messages=[{"role": "user", "content": "What is a gateway?"}]
    )
    completion = raw.parse()
    assert completion.choices[0].message.content
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage.prompt_tokens > 0 and completion.usage.completion_tokens > 0
    assert raw.headers["x-gateway-model"] == "small"
    assert raw.headers["x-gateway-deployment"] == "sim-small"
    assert raw.headers["x-gateway-upstream-model"] == "sim-small"
    assert float(raw.headers["x-gateway-overhead-ms"]) >= 0
    request_id = raw.headers["x-request-id"]
    assert completion._request_id == request_id

    line = gateway.request_log(request_id)
    assert line["tenant"] == "acme" and line["key"] == "main"
    assert line["model_requested"] == "small" and line["upstream_model"] == "sim-small"
    assert line["status"] == 200
    assert line["prompt_tokens"] == completion.usage.prompt_tokens
    assert line["completion_tokens"] == completion.usage.completion_tokens
    assert line["overhead_ms"] >= 0 and line["latency_ms"] >= line["overhead_ms"]
    assert "prompt" not in line  # prompts are not logged unless configured


def test_same_prompt_gets_the_same_answer(client):
    ask = lambda: client.chat.completions.create(  # noqa: E731
        model="small", messages=[{"role": "user", "content": "Tell me about caches"}]).choices[0].message.content
    assert ask() == ask()


def test_stream_arrives_chunk_by_chunk(client, sim):
    sim.control(itl_ms=60.0)
    arrivals, text = [], []
    stream = client.chat.completions.create(
        model="small", messages=[{"role": "user", "content": "stream please"}], stream=True, max_tokens=12
    )
    for chunk in stream:
        arrivals.append(time.monotonic())
        if chunk.choices and chunk.choices[0].delta.content:
            text.append(chunk.choices[0].delta.content)
    assert len(text) == 12
    # 12 tokens 60 ms apart: the first ones were in hand well before the stream ended.
    assert arrivals[-1] - arrivals[1] > 0.3


def test_stream_without_include_usage_gets_no_usage_chunk_but_is_accounted(gateway, client):
    raw = client.chat.completions.with_raw_response.create(
        model="small", messages=[{"role": "user", "content": "count me"}], stream=True, max_tokens=5
    )
    chunks = list(raw.parse())
    assert all(chunk.choices for chunk in chunks), "the usage-only chunk the gateway asked for leaked through"
    assert all(getattr(chunk, "usage", None) is None for chunk in chunks)
    line = gateway.request_log(raw.headers["x-request-id"])
    assert line["completion_tokens"] == 5 and line["prompt_tokens"] > 0 and line["stream"] is True


def test_stream_with_include_usage_ends_with_usage(client):
    chunks = list(client.chat.completions.create(
        model="small", messages=[{"role": "user", "content": "usage please"}], stream=True, max_tokens=4,
        stream_options={"include_usage": True},
    ))
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 4
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(content.split()) == 4


def test_streamed_and_plain_answers_agree(client):
    messages = [{"role": "user", "content": "same either way"}]
    plain = client.chat.completions.create(model="small", messages=messages).choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="small", messages=messages, stream=True) if c.choices)
    assert plain == streamed


def test_text_completions_plain_and_streamed(client):
    completion = client.completions.create(model="small", prompt="Once upon a time", max_tokens=6, logprobs=2)
    assert len(completion.choices[0].text.split()) == 6
    assert len(completion.choices[0].logprobs.tokens) == 6
    assert completion.usage.completion_tokens == 6
    pieces = [c.choices[0].text for c in client.completions.create(
        model="small", prompt="Once upon a time", max_tokens=6, stream=True) if c.choices]
    assert "".join(pieces) == completion.choices[0].text


def test_embeddings_in_both_encodings(client):
    response = client.embeddings.create(model="embed", input=["alpha", "beta"])  # the SDK asks for base64
    assert len(response.data) == 2 and len(response.data[0].embedding) == 384
    assert response.usage.prompt_tokens == 2
    floats = client.embeddings.create(model="embed", input="alpha", encoding_format="float", dimensions=8)
    assert len(floats.data[0].embedding) == 8
    again = client.embeddings.create(model="embed", input="alpha", dimensions=8)
    assert again.data[0].embedding == pytest.approx(floats.data[0].embedding, rel=1e-6)


def test_raw_base64_embedding_is_float32(gateway, keys):
    status, body = http_request(gateway.port, "POST", "/v1/embeddings",
                                b'{"model":"embed","input":"x","encoding_format":"base64","dimensions":4}',
                                {"Authorization": f"Bearer {keys.acme}"})
    assert status == 200
    assert len(struct.unpack("<4f", base64.b64decode(body["data"][0]["embedding"]))) == 4


def test_models_list_only_what_the_tenant_may_use(gateway, keys):
    limited = gateway.client(keys.limited)
    assert sorted(m.id for m in limited.models.list()) == ["embed", "small"]
    assert limited.models.retrieve("small").id == "small"
    with pytest.raises(openai.NotFoundError) as caught:
        limited.models.retrieve("large")
    assert caught.value.code == "model_not_found"
    everything = {m.id for m in gateway.client(keys.acme).models.list()}
    assert {"small", "large", "pair", "embed"} <= everything
    card = gateway.client(keys.acme).models.retrieve("small")
    assert card.object == "model" and card.owned_by


def test_model_the_tenant_may_not_use_is_not_found(gateway, keys):
    limited = gateway.client(keys.limited)
    with pytest.raises(openai.NotFoundError) as caught:
        limited.chat.completions.create(model="large", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.code == "model_not_found"
    assert caught.value.status_code == 404
    with pytest.raises(openai.NotFoundError):
        limited.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])


def test_routes_without_v1_prefix(gateway, keys):
    import openai as sdk

    bare = sdk.OpenAI(base_url=gateway.url, api_key=keys.acme, max_retries=0)
    assert bare.chat.completions.create(model="small", messages=[{"role": "user", "content": "hi"}]).choices
    assert bare.models.list().data


def test_deployments_of_a_model_take_turns(client):
    used = {client.chat.completions.with_raw_response.create(
        model="pair", messages=[{"role": "user", "content": "hi"}]).headers["x-gateway-deployment"]
        for _ in range(4)}
    assert used == {"pair-a", "pair-b"}


def test_embedding_model_refuses_chat(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="embed", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.code == "model_not_supported"


def test_health_readiness_and_metrics(gateway, client):
    client.chat.completions.create(model="small", messages=[{"role": "user", "content": "metric me"}])
    assert http_request(gateway.port, "GET", "/health/live") == (200, {"status": "ok"})
    status, body = http_request(gateway.port, "GET", "/health/ready")
    assert status == 200 and body["status"] == "ready"
    status, metrics = http_request(gateway.port, "GET", "/metrics")
    assert status == 200
    assert b'gateway_requests_total{model="small",route="chat.completions",status="200",tenant="acme"}' in metrics


def test_unknown_route_is_an_openai_error(gateway):
    status, body = http_request(gateway.port, "GET", "/v1/nothing-here")
    assert status == 404 and body["error"]["type"] == "not_found_error"
    status, body = http_request(gateway.port, "GET", "/v1/chat/completions")
    assert status == 405 and "POST" in body["error"]["message"]

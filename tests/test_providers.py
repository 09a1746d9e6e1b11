"""Providers that do not speak OpenAI's API, through LiteLLM: the simulator speaks Anthropic's Messages API, Gemini's
generateContent and Azure OpenAI's deployment URLs, and the gateway is used as any client would use it."""

from __future__ import annotations

import json
import time

import openai
import pytest
import yaml
from pydantic import BaseModel

from conftest import GatewayProcess, Simulator, http_request, ledger_row
from gateway.config.keys import generate_key, hash_key

PROVIDER_KEY = "sk-provider-test-key-0123"
HELLO = [{"role": "user", "content": "hello there"}]


class Answer(BaseModel):
    title: str
    score: int


@pytest.fixture(scope="module")
def providers(tmp_path_factory):
    sim = Simulator("--api-key", PROVIDER_KEY)  # every protocol checks the provider key its own way
    openai_sim = Simulator()
    config = tmp_path_factory.mktemp("providers")
    key = generate_key()
    pricing = {"input_per_million": 3.0, "output_per_million": 15.0}
    models = {
        "defaults": {"timeouts": {"connect": 2, "read": 20}, "fallbacks": {"cooldown_seconds": 1}},
        "router": {"aliases": {"auto": {}}, "classifier": {"scorer": "none"},
                   "profiles": {"default": {"simple": "claude", "moderate": "claude", "complex": "gpt",
                                            "critical": "gpt"}}},
        "models": {
            "claude": {"size": "small", "pricing": pricing, "fallbacks": ["gpt"], "deployments": [
                {"name": "anthropic", "provider": "anthropic", "model": "claude-sonnet-4-5", "api_base": sim.url,
                 "api_key": "env:PROVIDER_KEY"}]},
            "gemini-flash": {"pricing": pricing, "deployments": [
                {"name": "gemini", "model": "gemini/gemini-2.5-flash", "api_base": f"{sim.url}/v1beta",
                 "api_key": "env:PROVIDER_KEY"}]},
            "gemini-backed": {"pricing": pricing, "fallbacks": ["gpt"], "deployments": [
                {"name": "gemini-b", "model": "gemini/gemini-2.5-flash", "api_base": f"{sim.url}/v1beta",
                 "api_key": "env:PROVIDER_KEY"}]},
            "azure-gpt": {"pricing": pricing, "deployments": [
                {"name": "azure", "provider": "azure", "model": "my-gpt-deployment", "api_base": sim.url,
                 "api_version": "2024-10-21", "api_key": "env:PROVIDER_KEY"}]},
            "claude-bad-key": {"deployments": [
                {"name": "anthropic-bad", "provider": "anthropic", "model": "claude-sonnet-4-5", "api_base": sim.url,
                 "api_key": "env:WRONG_KEY"}]},
            "gpt": {"size": "large", "pricing": pricing, "deployments": [
                {"name": "openai-sim", "api_base": f"{openai_sim.url}/v1", "model": "gpt"}]},
        },
    }
    (config / "models.yaml").write_text(yaml.safe_dump(models))
    (config / "tenants.yaml").write_text(yaml.safe_dump({"tenants": {"acme": {
        "name": "Acme", "tier": "enterprise", "keys": [{"name": "k", "sha256": hash_key(key)}]}}}))
    gateway = GatewayProcess(config, env={"PROVIDER_KEY": PROVIDER_KEY, "WRONG_KEY": "sk-wrong"})
    yield gateway, gateway.client(key), sim, openai_sim
    gateway.stop()
    sim.stop()
    openai_sim.stop()


@pytest.mark.parametrize("model", ["claude", "gemini-flash", "azure-gpt"])
def test_plain_and_streamed_answers_in_openais_shape(providers, stores, model):
    gateway, client, sim, _ = providers
    raw = client.chat.completions.with_raw_response.create(model=model, messages=HELLO, max_tokens=12)
    answer = raw.parse()
    assert answer.object == "chat.completion" and answer.choices[0].message.content
    assert answer.usage.completion_tokens == 12 and answer.choices[0].finish_reason == "length"
    row = ledger_row(stores, raw.headers["x-request-id"])
    assert row["completion_tokens"] == 12 and float(row["cost_usd"]) > 0
    chunks = list(client.chat.completions.create(model=model, messages=HELLO, max_tokens=12, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() == answer.choices[0].message.content.strip()  # the same prompt, the same words
    assert chunks[-1].usage.completion_tokens == 12 and not chunks[-1].choices
    plain_stream = list(client.chat.completions.create(model=model, messages=HELLO, max_tokens=5, stream=True))
    assert all(c.usage is None for c in plain_stream)  # usage only when asked for
    status, body = http_request(gateway.port, "POST", "/v1/chat/completions",
                                json.dumps({"model": model, "messages": HELLO, "stream": True}).encode(),
                                {"Authorization": client.api_key and f"Bearer {client.api_key}",
                                 "Content-Type": "application/json"})
    assert body.count(b"data: [DONE]") == 1
    for line in gateway.log_path.read_text().splitlines():  # LiteLLM's own lines would break the JSON log
        assert json.loads(line).get("logger") != "LiteLLM", line


@pytest.mark.parametrize("model", ["claude", "gemini-flash", "azure-gpt"])
def test_tools_and_structured_output(providers, model):
    _, client, _, _ = providers
    tool = openai.pydantic_function_tool(Answer, name="answer")
    called = client.chat.completions.parse(model=model, messages=HELLO, tools=[tool], tool_choice="required")
    assert isinstance(called.choices[0].message.tool_calls[0].function.parsed_arguments, Answer)
    parsed = client.chat.completions.parse(model=model, messages=HELLO, response_format=Answer)
    assert isinstance(parsed.choices[0].message.parsed, Answer)


def test_errors_keep_the_providers_status_in_openais_shape(providers):
    _, client, sim, _ = providers
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model="claude-bad-key", messages=HELLO)
    assert caught.value.status_code == 502 and caught.value.code == "upstream_auth_failed"
    assert "sk-wrong" not in str(caught.value.body) and PROVIDER_KEY not in str(caught.value.body)
    sim.control(error_rate=1.0, error_status=429)
    try:
        with pytest.raises(openai.RateLimitError) as caught:
            client.chat.completions.create(model="gemini-flash", messages=HELLO)
        assert "gemini" in caught.value.message
    finally:
        sim.control(error_rate=0.0)


@pytest.mark.parametrize("model", ["gemini-flash", "azure-gpt", "claude-bad-key"])
def test_a_stream_refused_before_its_first_byte_keeps_the_status_and_falls_back(providers, model):
    _, client, sim, _ = providers
    sim.control(error_rate=1.0, error_status=429)
    try:
        with pytest.raises(openai.APIStatusError) as caught:  # the status, as for a request that is not streamed
            list(client.chat.completions.create(model=model, messages=HELLO, stream=True))
        assert caught.value.status_code in (429, 502), caught.value
        message = caught.value.message
        assert "b'" not in message and "Handle with" not in message and "litellm" not in message, message
        raw = client.chat.completions.with_raw_response.create(model="gemini-backed", messages=HELLO, stream=True,
                                                               stream_options={"include_usage": True})
        assert raw.headers["x-gateway-model"] == "gpt" and "gemini-b:429" in raw.headers["x-gateway-fallbacks"]
        assert "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
    finally:
        sim.control(error_rate=0.0)
    time.sleep(1.2)  # the cooldown
    chunks = list(client.chat.completions.create(model="gemini-backed", messages=HELLO, stream=True,
                                                 stream_options={"include_usage": True}))
    assert "cost" not in chunks[-1].usage.model_dump() and chunks[-1].usage.completion_tokens > 0


def test_a_failing_provider_falls_back_to_another_and_comes_back(providers):
    _, client, sim, openai_sim = providers
    sim.control(error_rate=1.0, error_status=529)  # Anthropic overloaded
    try:
        raw = client.chat.completions.with_raw_response.create(model="claude", messages=HELLO)
        assert raw.headers["x-gateway-model"] == "gpt" and "anthropic:529" in raw.headers["x-gateway-fallbacks"]
    finally:
        sim.control(error_rate=0.0)
    time.sleep(1.2)  # the cooldown
    raw = client.chat.completions.with_raw_response.create(model="claude", messages=HELLO)
    assert raw.headers["x-gateway-model"] == "claude"


def test_the_cascade_judges_a_provider_without_logprobs_by_its_words(providers):
    _, client, _, _ = providers
    sure = client.chat.completions.with_raw_response.create(model="auto", messages=HELLO)
    assert sure.headers["x-gateway-model"] == "claude" and sure.headers["x-gateway-cascaded"] == "false"
    unsure = client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "hello sim:unsure"}])
    assert unsure.headers["x-gateway-cascaded"] == "true" and unsure.headers["x-gateway-model"] == "gpt"


def test_the_cache_answers_a_provider_request_again(providers):
    _, client, _, _ = providers
    ask = dict(model="claude", messages=[{"role": "user", "content": "cache this"}], temperature=0)
    assert client.chat.completions.with_raw_response.create(**ask).headers["x-gateway-cache"] == "miss"
    time.sleep(0.3)
    assert client.chat.completions.with_raw_response.create(**ask).headers["x-gateway-cache"] == "hit"


def test_a_client_that_leaves_cancels_the_provider_call(providers):
    gateway, client, sim, _ = providers
    sim.reset()
    sim.control(ttft_ms=3000.0)
    try:
        quick = gateway.client(client.api_key, timeout=0.5)
        with pytest.raises(openai.APITimeoutError):
            quick.chat.completions.create(model="claude", messages=HELLO, stream=True).__next__()
        deadline = time.monotonic() + 5
        while sim.stats()["cancelled"] < 1:
            assert time.monotonic() < deadline, sim.stats()
            time.sleep(0.1)
    finally:
        sim.control(ttft_ms=0.0)


def test_timeouts_are_504s(providers, tmp_path):
    gateway, client, sim, _ = providers
    sim.control(hang_rate=1.0)
    try:
        config = yaml.safe_load((gateway.config_dir / "models.yaml").read_text())
        config["models"]["claude"]["deployments"][0]["timeouts"] = {"connect": 1, "read": 1}
        config["models"]["claude"]["fallbacks"] = []
        fast = tmp_path / "c"
        fast.mkdir()
        (fast / "models.yaml").write_text(yaml.safe_dump(config))
        (fast / "tenants.yaml").write_text((gateway.config_dir / "tenants.yaml").read_text())
        other = GatewayProcess(fast, env={"PROVIDER_KEY": PROVIDER_KEY})
        try:
            with pytest.raises(openai.APIStatusError) as caught:
                other.client(client.api_key).chat.completions.create(model="claude", messages=HELLO)
            assert caught.value.status_code == 504 and caught.value.code == "upstream_timeout"
        finally:
            other.stop()
    finally:
        sim.control(hang_rate=0.0)


def test_litellm_is_loaded_only_for_a_config_that_needs_it(providers, gateway):
    with_providers, _, _, _ = providers
    loaded = lambda g: any("LiteLLM loaded" in line.get("message", "") for line in g.log_lines())  # noqa: E731
    assert loaded(with_providers) and not loaded(gateway)
    _, metrics = http_request(gateway.port, "GET", "/metrics")
    assert b"gateway_provider_calls" not in metrics or b'gateway_provider_calls_total{' not in metrics

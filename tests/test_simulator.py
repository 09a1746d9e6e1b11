"""The simulator speaks vLLM's wire format: LoRA endpoints, metrics, model list, faults."""

from __future__ import annotations

import json

import openai
import pytest

from conftest import Simulator, http_request


@pytest.fixture(scope="module")
def lora_sim():
    simulator = Simulator("--model", "base-model", "--max-loras", "2")
    yield simulator
    simulator.stop()


def _post(sim, path: str, body: dict):
    return http_request(sim.port, "POST", path, json.dumps(body).encode(), {"Content-Type": "application/json"})


def test_lora_load_and_unload_like_vllm(lora_sim):
    status, text = _post(lora_sim, "/v1/load_lora_adapter", {"lora_name": "acme", "lora_path": "/adapters/acme"})
    assert status == 200 and text == b"Success: LoRA adapter 'acme' added successfully."
    status, error = _post(lora_sim, "/v1/load_lora_adapter", {"lora_name": "acme", "lora_path": "/adapters/acme"})
    assert status == 400 and error["error"]["message"] == "The lora adapter 'acme' has already been loaded."
    status, error = _post(lora_sim, "/v1/load_lora_adapter", {"lora_name": "x"})
    assert status == 400 and "Both 'lora_name' and 'lora_path'" in error["error"]["message"]
    status, error = _post(lora_sim, "/v1/unload_lora_adapter", {"lora_name": "ghost"})
    assert status == 404 and error["error"]["message"] == "The lora adapter 'ghost' cannot be found."
    status, text = _post(lora_sim, "/v1/unload_lora_adapter", {"lora_name": "acme"})
    assert status == 200 and text == b"Success: LoRA adapter 'acme' removed successfully."
    status, error = _post(lora_sim, "/v1/load_lora_adapter", {"lora_name": "base-model", "lora_path": "/a/b"})
    assert status == 400 and "conflicts with a served base model" in error["error"]["message"]


def test_requests_naming_an_adapter_are_served_from_lru_slots(lora_sim):
    client = openai.OpenAI(base_url=f"{lora_sim.url}/v1", api_key="none", max_retries=0)
    before = lora_sim.stats()
    for name in ("a1", "a2", "a3"):
        _post(lora_sim, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": f"/adapters/{name}"})
    ids = {m.id for m in client.models.list()}
    assert {"base-model", "a1", "a2", "a3"} <= ids
    # Two slots: each load brings its adapter in (a3's pushes out a1); then a1 evicts a2, a2 evicts a3, a1 is in
    # already and a3 evicts a2, the least recently used each time.
    for name in ("a1", "a2", "a1", "a3"):
        answer = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}])
        assert answer.model == name
    stats = lora_sim.stats()
    assert stats["lora_active"] == ["a1", "a3"]
    assert stats["lora_swaps"] - before["lora_swaps"] == 6 and stats["lora_loads"] - before["lora_loads"] == 3
    status, metrics = http_request(lora_sim.port, "GET", "/metrics")
    # No request is running now: vLLM lists the adapters of running and waiting requests.
    assert b'vllm:lora_requests_info{max_lora="2",running_lora_adapters="",waiting_lora_adapters=""}' in metrics
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="not-loaded", messages=[{"role": "user", "content": "hi"}])


def test_metrics_use_vllms_names(lora_sim):
    status, metrics = http_request(lora_sim.port, "GET", "/metrics")
    assert status == 200
    for name in (b"vllm:num_requests_running", b"vllm:num_requests_waiting", b"vllm:kv_cache_usage_perc",
                 b"vllm:lora_requests_info", b"vllm:prompt_tokens_total", b"vllm:generation_tokens_total"):
        assert name in metrics


def test_unsure_marker_gives_low_logprobs(sim):
    client = openai.OpenAI(base_url=f"{sim.url}/v1", api_key="none", max_retries=0)
    sure = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "2+2?"}], logprobs=True)
    unsure = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "sim:unsure 2+2?"}],
                                            logprobs=True)
    mean = lambda c: sum(t.logprob for t in c.choices[0].logprobs.content) / len(c.choices[0].logprobs.content)  # noqa
    assert mean(sure) > -0.1 and mean(unsure) < -0.8
    assert unsure.choices[0].message.content.startswith("I'm not sure")


def test_controls_reject_unknown_settings(sim):
    status, body = http_request(sim.port, "POST", "/sim/control", b'{"latency": 5}')
    assert status == 400 and "unknown setting 'latency'" in body["error"]["message"]


def test_other_protocols_as_their_sdks_call_them():
    simulator = Simulator("--api-key", "sk-provider")
    try:
        message = {"model": "claude", "max_tokens": 5, "messages": [{"role": "user", "content": "hello there"}]}
        anthropic = {"anthropic-version": "2023-06-01", "Content-Type": "application/json"}
        for auth in ({"x-api-key": "sk-provider"}, {"Authorization": "Bearer sk-provider"}):  # auth_token= sends this
            status, answer = http_request(simulator.port, "POST", "/v1/messages", json.dumps(message).encode(),
                                          {**anthropic, **auth})
            assert status == 200 and answer["type"] == "message", answer
        status, counted = http_request(simulator.port, "POST", "/v1/messages/count_tokens",
                                       json.dumps(message).encode(), {**anthropic, "x-api-key": "sk-provider"})
        assert status == 200 and counted["input_tokens"] > 0
        status, _ = http_request(simulator.port, "POST", "/v1/messages", json.dumps(message).encode(),
                                 {**anthropic, "Authorization": "Bearer sk-wrong"})
        assert status == 401
        gemini = {"contents": [{"role": "user", "parts": [{"text": "hello there"}]}]}
        for version in ("v1beta", "v1"):  # google-genai with a base URL and no version posts to /v1
            status, answer = http_request(simulator.port, "POST", f"/{version}/models/gemini-2.5-flash:generateContent",
                                          json.dumps(gemini).encode(), {"x-goog-api-key": "sk-provider",
                                                                         "Content-Type": "application/json"})
            assert status == 200 and answer["candidates"][0]["content"]["parts"][0]["text"], answer
    finally:
        simulator.stop()

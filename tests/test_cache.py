"""The response cache in Redis through the gateway: hits, misses, isolation, controls, TTL, streams, Redis down."""

from __future__ import annotations

import json
import time
import uuid

import openai
import pytest
import yaml

from conftest import GatewayProcess, Simulator, http_request, ledger_row
from gateway.config.keys import generate_key, hash_key

ADMIN_KEY = "sk-admin-cache-0123456789abcdef"


@pytest.fixture(scope="module")
def cache_sim():
    sim = Simulator()
    yield sim
    sim.stop()


@pytest.fixture(scope="module")
def keys() -> dict[str, str]:
    return {name: generate_key() for name in ("one", "two", "nocache", "loose")}


def _write_config(config_dir, sim_url: str, keys: dict[str, str], redis_url: str | None = None) -> None:
    deployment = lambda name, upstream: {"name": name, "api_base": f"{sim_url}/v1", "model": upstream}  # noqa: E731
    models = {
        "defaults": {"cache": {"ttl_seconds": 600}},
        "models": {
            "chat": {"size": "small", "pricing": {"input_per_million": 1, "output_per_million": 2},
                     "deployments": [deployment("sim-chat", "chat-up")]},
            "big": {"size": "large", "deployments": [deployment("sim-big", "big-up")]},
            "uncached": {"cache": {"enabled": False}, "deployments": [deployment("sim-uncached", "x-up")]},
            "tiny": {"cache": {"max_entry_bytes": 200}, "deployments": [deployment("sim-tiny", "tiny-up")]},
        },
    }
    tenant = lambda key, **extra: {"name": "t", "tier": "enterprise",  # noqa: E731
                                   "keys": [{"name": "k", "sha256": hash_key(key)}], **extra}
    tenants = {"tenants": {
        "one": tenant(keys["one"]),
        "two": tenant(keys["two"]),
        "nocache": tenant(keys["nocache"], cache={"enabled": False}),
        "loose": tenant(keys["loose"], cache={"nondeterministic": True}),
    }}
    (config_dir / "models.yaml").write_text(yaml.safe_dump(models, sort_keys=False))
    (config_dir / "tenants.yaml").write_text(yaml.safe_dump(tenants, sort_keys=False))


@pytest.fixture(scope="module")
def gateway(cache_sim, keys, tmp_path_factory) -> GatewayProcess:
    config_dir = tmp_path_factory.mktemp("cache")
    _write_config(config_dir, cache_sim.url, keys)
    process = GatewayProcess(config_dir, env={"GATEWAY_ADMIN_KEY": ADMIN_KEY})
    yield process
    process.stop()


@pytest.fixture(autouse=True)
def _reset(cache_sim):
    cache_sim.reset()
    yield


def ask(gateway, key, content=None, model="chat", headers=None, **options):
    """A deterministic chat request (temperature 0) unless told otherwise; (headers, answer)."""
    options.setdefault("temperature", 0)
    client = gateway.client(key)
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": content or f"question {uuid.uuid4()}"}],
        extra_headers=headers or {}, **options)
    return raw.headers, raw.parse()


def upstream_calls(sim: Simulator) -> int:
    return sim.stats()["requests"]


def wait_stored(gateway, key, content, **options):
    """The store is written after the answer; ask until it is a hit."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        headers, answer = ask(gateway, key, content, **options)
        if headers.get("x-gateway-cache") == "hit":
            return headers, answer
        time.sleep(0.05)
    raise AssertionError("never a hit")


def test_a_repeat_is_a_hit_that_costs_nothing(gateway, keys, cache_sim, stores):
    question = f"capital of France? {uuid.uuid4()}"
    first_headers, first = ask(gateway, keys["one"], question)
    assert first_headers["x-gateway-cache"] == "miss"
    headers, again = wait_stored(gateway, keys["one"], question)
    assert upstream_calls(cache_sim) == 1
    assert again.choices[0].message.content == first.choices[0].message.content and again.id == first.id
    assert headers["x-gateway-model"] == "chat" and headers["x-gateway-cost-usd"] == "0.000000000"
    assert headers["x-gateway-cached-request-id"] == first_headers["x-request-id"]
    row = ledger_row(stores, headers["x-request-id"])
    assert row["cache_hit"] is True and float(row["cost_usd"]) == 0 and row["prompt_tokens"] == 0
    assert row["status"] == 200 and row["model"] == "chat"
    first_row = ledger_row(stores, first_headers["x-request-id"])
    assert first_row["cache_hit"] is False and float(first_row["cost_usd"]) > 0


def test_everything_that_shapes_the_answer_is_in_the_key(gateway, keys, cache_sim):
    question = f"name three colours {uuid.uuid4()}"
    wait_stored(gateway, keys["one"], question)
    calls = upstream_calls(cache_sim)
    for options in ({"max_tokens": 5}, {"seed": 7}, {"stop": ["x"]}, {"model": "big"},
                    {"response_format": {"type": "json_object"}},
                    {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]}):
        headers, _ = ask(gateway, keys["one"], question, **options)
        assert headers["x-gateway-cache"] == "miss", options
    assert upstream_calls(cache_sim) == calls + 6
    headers, _ = ask(gateway, keys["one"], question, user="someone-else")  # who the end user is does not matter
    assert headers["x-gateway-cache"] == "hit"


def test_one_tenant_never_gets_anothers_entry(gateway, keys):
    question = f"secret plan {uuid.uuid4()}"
    wait_stored(gateway, keys["one"], question)
    headers, _ = ask(gateway, keys["two"], question)
    assert headers["x-gateway-cache"] == "miss"


def test_cache_control_no_cache_and_no_store(gateway, keys, cache_sim):
    question = f"no-cache {uuid.uuid4()}"
    wait_stored(gateway, keys["one"], question)
    calls = upstream_calls(cache_sim)
    headers, _ = ask(gateway, keys["one"], question, headers={"Cache-Control": "no-cache"})
    assert headers["x-gateway-cache"] == "miss" and upstream_calls(cache_sim) == calls + 1

    fresh = f"no-store {uuid.uuid4()}"
    headers, _ = ask(gateway, keys["one"], fresh, headers={"Cache-Control": "no-store"})
    assert headers["x-gateway-cache"] == "bypass; no-store"
    time.sleep(0.3)
    headers, _ = ask(gateway, keys["one"], fresh)
    assert headers["x-gateway-cache"] == "miss"  # nothing was stored


def test_ttl_override_and_expiry(gateway, keys):
    question = f"short-lived {uuid.uuid4()}"
    ask(gateway, keys["one"], question, headers={"x-gateway-cache-ttl": "1"})
    headers, _ = wait_stored(gateway, keys["one"], question)
    time.sleep(1.6)
    headers, _ = ask(gateway, keys["one"], question)
    assert headers["x-gateway-cache"] == "miss"
    with pytest.raises(openai.BadRequestError) as caught:
        ask(gateway, keys["one"], question, headers={"x-gateway-cache-ttl": "soon"})
    assert caught.value.code == "invalid_cache_ttl"


def test_policy_nondeterministic_off_and_size(gateway, keys):
    question = f"creative {uuid.uuid4()}"
    headers, _ = ask(gateway, keys["one"], question, temperature=0.9)
    assert headers["x-gateway-cache"] == "bypass; nondeterministic"
    headers, _ = ask(gateway, keys["one"], question, temperature=0.9, seed=3)  # a seed makes it repeatable
    assert headers["x-gateway-cache"] == "miss"
    wait_stored(gateway, keys["loose"], question, temperature=0.9)  # this tenant caches them anyway
    headers, _ = ask(gateway, keys["nocache"], question)
    assert headers["x-gateway-cache"] == "bypass; off"
    headers, _ = ask(gateway, keys["one"], question, model="uncached")
    assert headers["x-gateway-cache"] == "bypass; off"
    ask(gateway, keys["one"], question, model="tiny")  # its answers are larger than the model's entry limit
    time.sleep(0.3)
    headers, _ = ask(gateway, keys["one"], question, model="tiny")
    assert headers["x-gateway-cache"] == "miss"


def _stream(gateway, key, content, include_usage: bool):
    client = gateway.client(key)
    options = {"stream_options": {"include_usage": True}} if include_usage else {}
    raw = client.chat.completions.with_raw_response.create(
        model="chat", messages=[{"role": "user", "content": content}], stream=True, temperature=0, **options)
    return raw.headers, list(raw.parse())


def test_a_streamed_hit_is_the_same_stream(gateway, keys, cache_sim):
    question = f"stream me {uuid.uuid4()}"
    headers, original = _stream(gateway, keys["one"], question, include_usage=False)
    assert headers["x-gateway-cache"] == "miss"
    deadline = time.monotonic() + 5
    while (hit := _stream(gateway, keys["one"], question, include_usage=True))[0]["x-gateway-cache"] != "hit":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    headers, replayed = hit
    assert headers["content-type"].startswith("text/event-stream")
    text = lambda chunks: "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)  # noqa: E731
    assert text(replayed) == text(original) and len(replayed) == len(original) + 1
    assert original[-1].usage is None and replayed[-1].usage is not None  # usage when asked, as an upstream would
    _, without = _stream(gateway, keys["one"], question, include_usage=False)
    assert [c.model_dump() for c in without] == [c.model_dump() for c in original]
    assert upstream_calls(cache_sim) == 1


def test_text_completions_are_cached_plain_and_streamed(gateway, keys, cache_sim):
    client = gateway.client(keys["one"])
    prompt = f"Once upon a time {uuid.uuid4()}"
    complete = lambda **extra: client.completions.with_raw_response.create(  # noqa: E731
        model="chat", prompt=prompt, max_tokens=8, temperature=0, **extra)
    first = complete()
    deadline = time.monotonic() + 5
    while (again := complete()).headers["x-gateway-cache"] != "hit":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert again.parse().choices[0].text == first.parse().choices[0].text
    streamed = complete(stream=True)
    assert streamed.headers["x-gateway-cache"] == "miss"  # a stream is its own entry
    original = "".join(c.choices[0].text for c in streamed.parse() if c.choices)
    deadline = time.monotonic() + 5
    while (replayed := complete(stream=True)).headers["x-gateway-cache"] != "hit":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert "".join(c.choices[0].text for c in replayed.parse() if c.choices) == original
    assert upstream_calls(cache_sim) == 2


def test_broken_streams_and_errors_are_never_stored(gateway, keys, cache_sim):
    question = f"fragile {uuid.uuid4()}"
    cache_sim.control(break_stream_after=2)
    with pytest.raises(openai.APIError):
        _stream(gateway, keys["one"], question, include_usage=False)
    cache_sim.control(break_stream_after=None, error_rate=1.0, error_status=500)
    with pytest.raises(openai.InternalServerError):
        ask(gateway, keys["one"], question)
    cache_sim.control(error_rate=0.0)
    time.sleep(0.3)
    headers, _ = _stream(gateway, keys["one"], question, include_usage=False)
    assert headers["x-gateway-cache"] == "miss"
    headers, _ = ask(gateway, keys["one"], question)
    assert headers["x-gateway-cache"] == "miss"


def test_admin_purges_one_tenants_cache(gateway, keys):
    mine, theirs = f"purge {uuid.uuid4()}", f"keep {uuid.uuid4()}"
    wait_stored(gateway, keys["one"], mine)
    wait_stored(gateway, keys["two"], theirs)
    status, answer = http_request(gateway.port, "DELETE", "/api/v1/organizations/one/cache",
                                  headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert status == 200 and answer["deleted"] >= 1
    assert ask(gateway, keys["one"], mine)[0]["x-gateway-cache"] == "miss"
    assert ask(gateway, keys["two"], theirs)[0]["x-gateway-cache"] == "hit"
    status, _ = http_request(gateway.port, "DELETE", "/api/v1/organizations/one/cache",
                             headers={"Authorization": f"Bearer {keys['one']}"})
    assert status == 403


def test_metrics_count_hits_misses_and_bytes(gateway, keys):
    question = f"metrics {uuid.uuid4()}"
    wait_stored(gateway, keys["one"], question)
    status, text = http_request(gateway.port, "GET", "/metrics")
    text = text.decode() if isinstance(text, bytes) else json.dumps(text)
    for line in ('gateway_cache_lookups_total{result="hit"}', 'gateway_cache_lookups_total{result="miss"}',
                 'gateway_cache_bytes_total{direction="stored"}', 'gateway_cache_bytes_total{direction="served"}'):
        assert line in text


def test_redis_down_serves_uncached_and_recovers(cache_sim, keys, stores, tmp_path):
    config_dir = tmp_path / "c"
    config_dir.mkdir()
    _write_config(config_dir, cache_sim.url, keys)
    gateway = GatewayProcess(config_dir)
    try:
        question = f"while down {uuid.uuid4()}"
        wait_stored(gateway, keys["one"], question)
        stores.stop_redis()
        try:
            headers, answer = ask(gateway, keys["one"], question)
            assert answer.choices[0].message.content and headers["x-gateway-cache"] == "miss"
        finally:
            stores.start_redis()
        deadline = time.monotonic() + 10
        fresh = f"after {uuid.uuid4()}"
        while True:
            ask(gateway, keys["one"], fresh)
            time.sleep(0.2)
            if ask(gateway, keys["one"], fresh)[0]["x-gateway-cache"] == "hit":
                break
            assert time.monotonic() < deadline, "the cache did not come back"
    finally:
        gateway.stop()

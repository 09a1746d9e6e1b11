"""The router through the gateway: profiles, context windows, budget, cascade and fallbacks, end to end.

Three simulators: one serves the small models, one the large ones, and one is made to fail. Prompts are chosen
so that the shipped classifier puts them in each class; "sim:unsure" makes a simulator answer unsure (low
logprobs, "I'm not sure").
"""

from __future__ import annotations

import json
import re
import time
import uuid

import openai
import pytest
import yaml

from conftest import GatewayProcess, Simulator, free_port, http_request, ledger_row, simulators
from gateway.config.keys import generate_key, hash_key

PROMPTS = {
    "simple": "Hi, how are you?",
    "moderate": "Tell me about incident management",
    "complex": "Analyze the root cause of database outage last night and recommend changes to the replication "
               "architecture",
    "critical": "We had a security breach exposing patient records; draft the HIPAA incident response plan",
}
TENANTS = ("fin", "health", "tech", "plain", "custom", "frugal", "norouter", "narrow")


@pytest.fixture(scope="module")
def sims():
    with simulators("small", "large", "flaky") as started:
        yield started


@pytest.fixture(scope="module")
def keys() -> dict[str, str]:
    return {tenant: generate_key() for tenant in TENANTS}


def _models(sims: dict[str, Simulator], dead_port: int) -> dict:
    def on(sim: str, name: str, upstream: str, **extra) -> dict:
        return {"name": name, "api_base": f"{sims[sim].url}/v1", "model": upstream, **extra}

    return {
        "defaults": {"timeouts": {"connect": 2, "read": 10}, "reference_model": "big",
                     "fallbacks": {"max_attempts": 3, "failures_before_cooldown": 2, "cooldown_seconds": 60}},
        "models": {
            "mini": {"size": "small", "context_window": 4000, "pricing": {"input_per_million": 0.15,
                                                                          "output_per_million": 0.6},
                     "deployments": [on("small", "mini-sim", "mini-up")]},
            "big": {"size": "large", "context_window": 8000, "pricing": {"input_per_million": 2.5,
                                                                         "output_per_million": 10},
                    "deployments": [on("large", "big-sim", "big-up")]},
            "huge": {"size": "largest", "context_window": 8000, "pricing": {"input_per_million": 10,
                                                                            "output_per_million": 30},
                     "deployments": [on("large", "huge-sim", "huge-up")]},
            "longctx": {"size": "large", "context_window": 20000, "pricing": {"input_per_million": 2,
                                                                              "output_per_million": 8},
                        "deployments": [on("large", "long-sim", "long-up")]},
            "free": {"size": "small", "deployments": [on("small", "free-sim", "free-up")]},
            "flaky": {"deployments": [on("flaky", "flaky-a", "flaky-up"), on("large", "flaky-b", "steady-up")]},
            "chain": {"fallbacks": ["big"], "deployments": [
                on("flaky", "chain-a", "chain-up"),
                {"name": "chain-dead", "api_base": f"http://127.0.0.1:{dead_port}/v1", "model": "x",
                 "priority": 1}]},
            "doomed": {"deployments": [on("flaky", "doomed-a", "doomed-up"), on("flaky", "doomed-b", "doomed-up"),
                                       on("flaky", "doomed-c", "doomed-up"), on("flaky", "doomed-d", "doomed-up")]},
        },
        "router": {
            "aliases": {"auto": {}, "auto-cheap": {"profile": "tech"}},
            "profiles": {
                "default": {"simple": "mini", "moderate": "mini", "complex": "big", "critical": "huge",
                            "long_context": "longctx", "economy": {"complex": "mini", "critical": "big"},
                            "over_budget": {"simple": "free", "moderate": "free", "complex": "free",
                                            "critical": "free"},
                            "tiers": {"basic": {"critical": "big"}}},
                "finance": {"simple": "mini", "moderate": "big", "complex": "big", "critical": "huge",
                            "cascade_threshold": 0.7},
                "healthcare": {"simple": "mini", "moderate": "big", "complex": "big", "critical": "huge"},
                "tech": {"simple": "mini", "moderate": "mini", "complex": "big", "critical": "big"},
            },
        },
    }


def _tenants(keys: dict[str, str]) -> dict:
    def tenant(tier: str, **extra) -> dict:
        return {"name": extra.pop("name", tier), "tier": tier, "keys": [{"name": "k", "sha256": hash_key(extra.pop(
            "key"))}], **extra}

    return {"tenants": {
        "fin": tenant("professional", key=keys["fin"], industry="finance"),
        "health": tenant("enterprise", key=keys["health"], industry="healthcare"),
        "tech": tenant("basic", key=keys["tech"], industry="tech"),
        "plain": tenant("basic", key=keys["plain"]),
        "custom": tenant("enterprise", key=keys["custom"], industry="tech",
                         routing={"complex": "huge", "cascade": False}),
        "frugal": tenant("enterprise", key=keys["frugal"], limits={"monthly_budget_usd": 1.0}),
        "norouter": tenant("enterprise", key=keys["norouter"], features=[]),
        "narrow": tenant("enterprise", key=keys["narrow"], models=["mini", "auto"]),
    }}


@pytest.fixture(scope="module")
def gateway(sims, keys, tmp_path_factory) -> GatewayProcess:
    config_dir = tmp_path_factory.mktemp("routing")
    (config_dir / "models.yaml").write_text(yaml.safe_dump(_models(sims, free_port()), sort_keys=False))
    (config_dir / "tenants.yaml").write_text(yaml.safe_dump(_tenants(keys), sort_keys=False))
    process = GatewayProcess(config_dir)
    yield process
    process.stop()


@pytest.fixture(autouse=True)
def _reset(sims):
    for sim in sims.values():
        sim.reset()
    yield


def chat(gateway: GatewayProcess, key: str, content: str, model: str = "auto", **options):
    client = gateway.client(key)
    raw = client.chat.completions.with_raw_response.create(model=model,
                                                           messages=[{"role": "user", "content": content}],
                                                           **options)
    return raw.headers, raw.parse()


# Classification and profiles


def test_router_alias_listed_for_tenants_with_the_router(gateway, keys):
    listed = [m.id for m in gateway.client(keys["fin"]).models.list().data]
    assert "auto" in listed and "auto-cheap" in listed and "mini" in listed
    assert gateway.client(keys["fin"]).models.retrieve("auto").owned_by == "gateway-router"
    assert "auto" not in [m.id for m in gateway.client(keys["norouter"]).models.list().data]
    with pytest.raises(openai.NotFoundError):
        chat(gateway, keys["norouter"], PROMPTS["simple"])


@pytest.mark.parametrize("tenant, complexity, model, rule", [
    ("fin", "simple", "mini", "finance:simple"),
    ("fin", "moderate", "big", "finance:moderate"),
    ("fin", "complex", "big", "finance:complex"),
    ("fin", "critical", "huge", "finance:critical"),
    ("health", "moderate", "big", "healthcare:moderate"),
    ("health", "critical", "huge", "healthcare:critical"),
    ("tech", "moderate", "mini", "tech/basic:moderate"),
    ("tech", "complex", "big", "tech/basic:complex"),
    ("tech", "critical", "big", "tech/basic:critical"),
    ("plain", "simple", "mini", "default/basic:simple"),
    ("plain", "critical", "big", "default/basic:critical"),  # the basic tier's change to the default profile
    ("custom", "complex", "huge", "tech+tenant:complex"),  # the tenant's own routing
])
def test_each_profile_routes_by_complexity(gateway, keys, stores, tenant, complexity, model, rule):
    headers, answer = chat(gateway, keys[tenant], PROMPTS[complexity])
    assert headers["x-gateway-complexity"] == complexity
    assert headers["x-gateway-model"] == model
    assert headers["x-gateway-routing-rule"].startswith(f"{rule}->{model}")
    assert headers["x-gateway-route-signals"]
    assert answer.choices[0].message.content
    row = ledger_row(stores, headers["x-request-id"])
    assert (row["complexity"], row["model"], row["model_requested"]) == (complexity, model, "auto")
    assert row["routing_rule"].startswith(rule) and row["route_score"] is not None
    assert row["cascaded"] is False


def test_alias_with_its_own_profile(gateway, keys):
    headers, _ = chat(gateway, keys["fin"], PROMPTS["moderate"], model="auto-cheap")
    assert headers["x-gateway-routing-rule"].startswith("tech:moderate") and headers["x-gateway-model"] == "mini"


def test_a_named_model_is_kept_whatever_the_request_says(gateway, keys):
    headers, _ = chat(gateway, keys["fin"], PROMPTS["critical"], model="mini")
    assert headers["x-gateway-model"] == "mini"
    assert "x-gateway-complexity" not in headers and "x-gateway-cascaded" not in headers


def test_profile_models_the_tenant_may_not_use_are_replaced(gateway, keys):
    headers, _ = chat(gateway, keys["narrow"], PROMPTS["critical"])
    assert headers["x-gateway-model"] == "mini"


def test_routed_to_embeddings_is_refused(gateway, keys):
    with pytest.raises(openai.BadRequestError) as caught:
        gateway.client(keys["fin"]).embeddings.create(model="auto", input="x")
    assert caught.value.code == "model_not_supported"


# Context windows


def test_too_long_for_the_chosen_model_goes_to_the_long_context_model(gateway, keys):
    long_prompt = "Hi, how are you? " + "word " * 9000  # about 9,000 tokens: past mini's 4,000 and big's 8,000
    headers, _ = chat(gateway, keys["tech"], long_prompt)
    assert headers["x-gateway-model"] == "longctx"
    assert ":long_context->longctx" in headers["x-gateway-routing-rule"]


def test_too_long_for_every_model_is_a_clear_400(gateway, keys):
    with pytest.raises(openai.BadRequestError) as caught:
        chat(gateway, keys["tech"], "word " * 30000)
    assert caught.value.code == "context_length_exceeded" and "20000" in caught.value.message


def test_a_prompt_past_the_size_counted_off_the_loop_is_counted_all_the_same(gateway, keys):
    """Bodies past 256 KiB have their tokens counted in a worker thread: the same counts, the same refusals."""
    counts = []
    for words in (30_000, 60_000):  # 150 KB, counted on the loop; 300 KB, counted in a worker thread
        with pytest.raises(openai.BadRequestError) as caught:
            chat(gateway, keys["tech"], "word " * words)
        assert caught.value.code == "context_length_exceeded"
        counts.append(int(re.search(r"\((\d+) in the messages\)", caught.value.message).group(1)))
    assert counts[1] - counts[0] == 30_000


def test_too_long_for_a_named_model_is_a_400(gateway, keys):
    with pytest.raises(openai.BadRequestError) as caught:
        chat(gateway, keys["tech"], "word " * 5000, model="mini")
    assert caught.value.code == "context_length_exceeded"
    assert "maximum context length is 4000 tokens" in caught.value.message


# Budget


def test_near_and_over_the_budget_cheaper_then_free_models(gateway, keys, stores):
    import redis

    month = time.strftime("%Y%m", time.gmtime())
    spend_key = f"gw:{{frugal}}:spend:{month}"
    store = redis.Redis.from_url(stores.redis_url)
    try:
        store.set(spend_key, int(0.85 * 1e9))  # 85% of the $1 budget
        chat(gateway, keys["frugal"], PROMPTS["simple"])  # the gateway learns the spend from this admission
        headers, _ = chat(gateway, keys["frugal"], PROMPTS["complex"])
        assert headers["x-gateway-model"] == "mini"
        assert headers["x-gateway-routing-rule"].startswith("default:economy:complex")

        store.set(spend_key, int(1.0 * 1e9))  # the whole budget spent
        with pytest.raises(openai.RateLimitError) as caught:
            chat(gateway, keys["frugal"], PROMPTS["complex"])  # a priced model is refused...
        assert caught.value.code == "insufficient_quota"
        headers, answer = chat(gateway, keys["frugal"], PROMPTS["complex"])  # ...then the free one is used
        assert headers["x-gateway-model"] == "free" and answer.choices[0].message.content
        assert headers["x-gateway-routing-rule"].startswith("default:over_budget:complex")
    finally:
        store.delete(spend_key)


# Cascade


def test_unsure_small_answer_cascades_to_the_next_model_and_both_are_billed(gateway, keys, sims, stores):
    headers, answer = chat(gateway, keys["tech"], "Hi, how are you? sim:unsure")
    assert headers["x-gateway-cascaded"] == "true"
    assert headers["x-gateway-model"] == "big"
    assert float(headers["x-gateway-confidence"]) < 0.6
    assert headers["x-gateway-routing-rule"].endswith("->mini=>big")
    assert answer.model == "big-up" and answer.choices[0].logprobs is None
    small_request = sims["small"].last_request()
    assert small_request["logprobs"] is True and not small_request.get("stream")
    row = ledger_row(stores, headers["x-request-id"])
    assert row["cascaded"] is True and row["model"] == "big"
    attempts = json.loads(row["attempts"])
    assert [a["model"] for a in attempts] == ["mini", "big"]
    assert attempts[0]["confidence"] < 0.6
    assert float(row["cost_usd"]) == pytest.approx(sum(a["cost_usd"] for a in attempts), abs=1e-9)
    assert row["prompt_tokens"] == sum(a["prompt_tokens"] for a in attempts)
    assert float(headers["x-gateway-cost-usd"]) == pytest.approx(float(row["cost_usd"]), abs=1e-8)


def test_sure_small_answer_is_kept_and_its_logprobs_stripped_unless_asked(gateway, keys, sims):
    headers, answer = chat(gateway, keys["tech"], PROMPTS["simple"])
    assert headers["x-gateway-cascaded"] == "false" and float(headers["x-gateway-confidence"]) >= 0.6
    assert headers["x-gateway-model"] == "mini" and answer.choices[0].logprobs is None
    assert sims["small"].last_request()["logprobs"] is True  # asked upstream for the judgement

    headers, answer = chat(gateway, keys["tech"], PROMPTS["simple"], logprobs=True, top_logprobs=2)
    assert answer.choices[0].logprobs is not None and len(answer.choices[0].logprobs.content[0].top_logprobs) == 2


def test_threshold_per_profile_and_tenant_switch(gateway, keys):
    headers, _ = chat(gateway, keys["custom"], "Hi, how are you? sim:unsure")  # the tenant turned cascades off
    assert headers["x-gateway-model"] == "mini" and "x-gateway-confidence" not in headers
    assert headers["x-gateway-cascaded"] == "false"


def test_streamed_sure_answer_is_replayed_as_a_clean_stream(gateway, keys):
    _, whole = chat(gateway, keys["tech"], PROMPTS["simple"])
    client = gateway.client(keys["tech"])
    raw = client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": PROMPTS["simple"]}], stream=True,
        stream_options={"include_usage": True})
    assert raw.headers["x-gateway-cascaded"] == "false" and raw.headers["content-type"].startswith("text/event-stream")
    chunks = list(raw.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason


def test_streamed_unsure_answer_is_replaced_by_the_larger_models_stream(gateway, keys, sims):
    client = gateway.client(keys["tech"])
    raw = client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "Hi, how are you? sim:unsure"}], stream=True)
    assert raw.headers["x-gateway-cascaded"] == "true" and raw.headers["x-gateway-model"] == "big"
    chunks = list(raw.parse())
    assert len(chunks) > 3 and all(c.model == "big-up" for c in chunks)
    assert all(c.usage is None for c in chunks)  # the client did not ask for usage
    assert sims["large"].last_request()["stream"] is True


def test_when_the_larger_model_fails_the_small_answer_is_sent(gateway, keys, sims):
    sims["large"].control(error_rate=1.0, error_status=503)
    headers, answer = chat(gateway, keys["tech"], "Hi, how are you? sim:unsure")
    assert headers["x-gateway-model"] == "mini" and answer.choices[0].message.content
    assert headers["x-gateway-cascaded"] == "false" and headers["x-gateway-routing-rule"].endswith("(failed)")


def test_only_the_answer_the_client_accepted_is_cached(gateway, keys, sims):
    unsure = f"Hi, how are you? sim:unsure {uuid.uuid4()}"
    headers, first = chat(gateway, keys["tech"], unsure, temperature=0)
    assert headers["x-gateway-cascaded"] == "true" and headers["x-gateway-cache"] == "miss"
    deadline = time.monotonic() + 5
    while (repeat := chat(gateway, keys["tech"], unsure, temperature=0))[0]["x-gateway-cache"] != "hit":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert repeat[0]["x-gateway-model"] == "big" and repeat[1].choices[0].message.content == \
        first.choices[0].message.content

    sims["large"].control(error_rate=1.0, error_status=503)  # the small answer is rejected, yet the only one
    rejected = f"Hi, how are you? sim:unsure {uuid.uuid4()}"
    headers, _ = chat(gateway, keys["tech"], rejected, temperature=0)
    assert headers["x-gateway-routing-rule"].endswith("(failed)")
    sims["large"].control(error_rate=0.0)
    time.sleep(0.3)
    headers, _ = chat(gateway, keys["tech"], rejected, temperature=0)
    assert headers["x-gateway-cache"] == "miss" and headers["x-gateway-cascaded"] == "true"


def test_the_agents_apis_are_routed_and_cascade_as_chat_completions_do(gateway, keys, stores):
    import anthropic

    messages = anthropic.Anthropic(base_url=gateway.url, api_key=keys["tech"], max_retries=0)
    raw = messages.messages.with_raw_response.create(
        model="auto", max_tokens=32, messages=[{"role": "user", "content": "Hi, how are you? sim:unsure"}])
    assert raw.headers["x-gateway-cascaded"] == "true" and raw.headers["x-gateway-model"] == "big"
    assert raw.parse().content[0].text
    row = ledger_row(stores, raw.headers["x-request-id"])
    assert row["route"] == "messages" and row["cascaded"] is True
    assert [a["model"] for a in json.loads(row["attempts"])] == ["mini", "big"]
    with messages.messages.stream(model="auto", max_tokens=32,
                                  messages=[{"role": "user", "content": PROMPTS["simple"]}]) as stream:
        sure = stream.get_final_message()  # the small model's whole answer, told again as Anthropic's events
    assert sure.content[0].text and sure.stop_reason in ("end_turn", "max_tokens")
    responses = gateway.client(keys["tech"]).responses
    raw = responses.with_raw_response.create(model="auto", input="Hi, how are you? sim:unsure")
    assert raw.headers["x-gateway-cascaded"] == "true" and raw.parse().output_text
    row = ledger_row(stores, raw.headers["x-request-id"])
    assert row["route"] == "responses" and row["cascaded"] is True and row["complexity"]


def test_text_completions_cascade_too(gateway, keys):
    client = gateway.client(keys["tech"])
    raw = client.completions.with_raw_response.create(model="auto", prompt="Hi there sim:unsure", max_tokens=8)
    assert raw.headers["x-gateway-cascaded"] == "true"
    assert raw.parse().choices[0].logprobs is None


# Fallbacks


def test_failing_deployment_falls_back_then_cools_down(gateway, keys, sims, stores):
    sims["flaky"].control(error_rate=1.0, error_status=502)
    fallbacks = []
    for _ in range(6):
        headers, answer = chat(gateway, keys["fin"], "hello", model="flaky")
        assert headers["x-gateway-deployment"] == "flaky-b" and answer.choices[0].message.content
        fallbacks.append(headers.get("x-gateway-fallbacks"))
    assert fallbacks.count("flaky-a:502") == 2  # two failures in a row cool flaky-a down for a minute
    assert fallbacks[-1] is None and sims["flaky"].stats()["requests"] == 2
    request_id = headers["x-request-id"]
    assert ledger_row(stores, request_id)["deployment"] == "flaky-b"


def test_every_deployment_down_goes_to_the_fallback_model(gateway, keys, sims, stores):
    sims["flaky"].control(error_rate=1.0, error_status=500)
    headers, answer = chat(gateway, keys["fin"], "hello", model="chain")
    assert headers["x-gateway-model"] == "big" and answer.model == "big-up"
    assert headers["x-gateway-fallbacks"] == "chain-a:500,chain-dead:502"
    row = ledger_row(stores, headers["x-request-id"])
    assert row["fallbacks"] == "chain-a:500,chain-dead:502" and row["status"] == 200
    assert [a["deployment"] for a in json.loads(row["attempts"])] == ["chain-a", "chain-dead", "big-sim"]


def test_attempts_are_bounded_and_the_client_gets_one_clear_error(gateway, keys, sims, stores):
    sims["flaky"].control(error_rate=1.0, error_status=503)
    with pytest.raises(openai.InternalServerError) as caught:
        chat(gateway, keys["fin"], "hello", model="doomed")
    assert caught.value.status_code == 503
    row = ledger_row(stores, caught.value.response.headers["x-request-id"])
    assert len(json.loads(row["attempts"])) == 3 and row["status"] == 503


def test_the_requests_own_errors_are_not_retried(gateway, keys, sims):
    sims["flaky"].control(error_rate=1.0, error_status=400)
    with pytest.raises(openai.BadRequestError):
        chat(gateway, keys["fin"], "hello", model="doomed")
    assert sims["flaky"].stats()["requests"] == 1


def test_a_hanging_deployment_times_out_and_falls_back(gateway, keys, sims, tmp_path):
    sims["flaky"].control(error_rate=1.0, error_status=429)
    headers, _ = chat(gateway, keys["fin"], "hello", model="chain")
    assert headers["x-gateway-fallbacks"].startswith("chain-a:429")


# Statistics


def test_routing_stats_per_tenant(gateway, keys):
    def stats(key: str) -> dict:
        status, report = http_request(gateway.port, "GET", "/v1/routing/stats",
                                      headers={"Authorization": f"Bearer {key}"})
        assert status == 200, report
        return report

    before = stats(keys["health"])["routed_requests"]
    for complexity in ("simple", "complex", "critical"):
        chat(gateway, keys["health"], PROMPTS[complexity])
    chat(gateway, keys["health"], "Hi, how are you? sim:unsure")
    deadline = time.monotonic() + 5
    while (report := stats(keys["health"]))["routed_requests"] < before + 4 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert report["by_complexity"]["critical"] >= 1 and report["by_complexity"]["simple"] >= 1
    assert sum(report["by_complexity"].values()) == report["routed_requests"] >= before + 4
    assert report["by_model"]["huge"] >= 1 and report["cascade_rate"] > 0
    assert report["savings"]["reference_model"] == "big"
    assert stats(keys["tech"])["tenant"] == "tech"

"""Limits and budgets: exact across gateway processes sharing one Redis, with OpenAI's 429s and headers."""

from __future__ import annotations

import concurrent.futures
import time
from pathlib import Path

import openai
import pytest
import yaml

from conftest import GatewayProcess, http_request, ledger_row
from gateway.config.keys import generate_key, hash_key

HELLO = [{"role": "user", "content": "hi"}]


def _config(path: Path, sim_url: str, tenants: dict, models: dict | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    models = models or {"small": {"pricing": {"input_per_million": 1.0, "output_per_million": 2.0},
                                  "deployments": [{"name": "sim", "api_base": f"{sim_url}/v1", "model": "sim"}]}}
    (path / "models.yaml").write_text(yaml.safe_dump({"models": models}))
    (path / "tenants.yaml").write_text(yaml.safe_dump({"tenants": tenants}))
    return path


def _tenant(key: str, tier: str = "enterprise", **limits) -> dict:
    return {"name": "T", "tier": tier, "limits": limits, "keys": [{"name": "k", "sha256": hash_key(key)}]}


def _unique(prefix: str) -> str:
    return f"{prefix}-{time.time_ns() % 10**9}"


def _away_from_minute_edge(seconds: float = 12.0) -> None:
    """Fixed windows: keep a burst inside one minute so the count is against one window."""
    left = 60 - time.time() % 60
    if left < seconds:
        time.sleep(left + 0.2)


def _call(client: openai.OpenAI, **extra) -> tuple[int, dict]:
    try:
        raw = client.chat.completions.with_raw_response.create(model="small", messages=HELLO, max_tokens=5, **extra)
        return raw.status_code, dict(raw.headers)
    except openai.APIStatusError as error:
        return error.status_code, {**dict(error.response.headers), "code": error.code, "type": error.type}


def test_requests_per_minute_is_exact_across_two_gateways(sim, tmp_path):
    key, tenant = generate_key(), _unique("burst")
    config = _config(tmp_path / "c", sim.url, {tenant: _tenant(key, requests_per_minute=30)})
    gateways = [GatewayProcess(config), GatewayProcess(config)]
    try:
        clients = [g.client(key) for g in gateways]
        _away_from_minute_edge()
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            results = list(pool.map(lambda i: _call(clients[i % 2]), range(100)))
    finally:
        for g in gateways:
            g.stop()
    statuses = [status for status, _ in results]
    assert statuses.count(200) == 30 and statuses.count(429) == 70
    refused = [headers for status, headers in results if status == 429]
    assert all(h["code"] == "rate_limit_exceeded" and int(h["retry-after"]) >= 1 for h in refused)
    served = [headers for status, headers in results if status == 200]
    assert all(h["x-ratelimit-limit-requests"] == "30" for h in served)
    assert sorted(int(h["x-ratelimit-remaining-requests"]) for h in served) == list(range(30))
    assert all(h["x-ratelimit-reset-requests"].endswith("s") for h in served)


def test_one_gateway_with_two_workers_keeps_limits_exact_and_every_row(sim, stores, tmp_path):
    """``serve --workers 2``: both worker processes share the stores, so a limit holds across them and every
    answer, served or refused, has its ledger row, and its log line whole (the workers share stdout, each writing
    its lines in batches)."""
    from gateway.stores.embedded import free_port

    key, tenant = generate_key(), _unique("workers")
    config = _config(tmp_path / "c", sim.url, {tenant: _tenant(key, requests_per_minute=25)})
    gateway = GatewayProcess(config, env={"GATEWAY_WORKERS": "2",  # workers need a Qdrant server; none is used
                                          "QDRANT_URL": f"http://127.0.0.1:{free_port()}"})
    try:
        client = gateway.client(key)
        _away_from_minute_edge()
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            statuses = [status for status, _ in pool.map(lambda _: _call(client), range(80))]
    finally:
        gateway.stop()
    assert statuses.count(200) == 25 and statuses.count(429) == 55
    logged = [line["status"] for line in gateway.log_lines() if line.get("event") == "request"
              and line.get("tenant") == tenant]
    assert sorted(logged) == [200] * 25 + [429] * 55
    rows = stores.query("SELECT status, count(*) AS n FROM usage_ledger WHERE tenant_id = $1 GROUP BY status", tenant)
    assert {row["status"]: row["n"] for row in rows} == {200: 25, 429: 55}


def test_concurrency_limit_holds_under_load(sim, tmp_path):
    key = generate_key()
    config = _config(tmp_path / "c", sim.url, {_unique("conc"): _tenant(key, concurrent_requests=3)})
    gateway = GatewayProcess(config)
    sim.control(ttft_ms=600.0)
    try:
        client = gateway.client(key)
        with concurrent.futures.ThreadPoolExecutor(10) as pool:
            results = list(pool.map(lambda _: _call(client), range(10)))
        statuses = [status for status, _ in results]
        assert statuses.count(200) == 3
        assert all(h["code"] == "concurrency_limit_exceeded" for s, h in results if s == 429)
        sim.control(ttft_ms=0.0)
        assert _call(client)[0] == 200  # slots are given back when requests end
    finally:
        gateway.stop()


def test_tokens_per_minute_counts_prompt_and_reserved_completion(sim, tmp_path):
    key = generate_key()
    config = _config(tmp_path / "c", sim.url, {_unique("tok"): _tenant(key, tokens_per_minute=100)})
    gateway = GatewayProcess(config)
    try:
        client = gateway.client(key)
        _away_from_minute_edge()
        status, headers = _call(client, extra_body={"max_tokens": 500})  # more than the whole minute allows
        assert status == 429 and headers["type"] == "tokens" and headers["code"] == "rate_limit_exceeded"
        statuses = [_call(client)[0] for _ in range(20)]  # each reserves ~12 prompt + 5 completion tokens
        assert 200 in statuses and 429 in statuses
        status, headers = _call(client)
        assert status == 429 and headers["type"] == "tokens"
    finally:
        gateway.stop()


def test_a_large_prompt_reserves_an_estimate_and_is_billed_what_the_upstream_counted(sim, stores, tmp_path):
    """Past 256 KiB a prompt's tokens are estimated from its size for the reservation (counting them would take a
    core for a tenth of a second); the ledger has the upstream's own count."""
    large = [{"role": "user", "content": "word " * 60_000}]  # 300 KB, 60,000 tokens; estimated 75,000
    small_key, big_key = generate_key(), generate_key()
    config = _config(tmp_path / "c", sim.url, {_unique("small"): _tenant(small_key, tokens_per_minute=50_000),
                                               _unique("big"): _tenant(big_key, tokens_per_minute=400_000)})
    gateway = GatewayProcess(config)
    try:
        _away_from_minute_edge()
        with pytest.raises(openai.RateLimitError) as caught:  # the estimate alone is past the minute's tokens
            gateway.client(small_key).chat.completions.create(model="small", messages=large, max_tokens=5)
        assert caught.value.type == "tokens"
        raw = gateway.client(big_key).chat.completions.with_raw_response.create(model="small", messages=large,
                                                                                max_tokens=5)
        answer = raw.parse()
        row = ledger_row(stores, raw.headers["x-request-id"])
        assert row["prompt_tokens"] == answer.usage.prompt_tokens != 75_000
        time.sleep(0.3)  # the reservation is settled as the request ends, after its answer has gone
        remaining = int(gateway.client(big_key).chat.completions.with_raw_response.create(
            model="small", messages=HELLO, max_tokens=5).headers["x-ratelimit-remaining-tokens"])
        settled = 400_000 - answer.usage.total_tokens  # then the next request's own reservation (a dozen tokens)
        assert settled - 20 <= remaining < settled
    finally:
        gateway.stop()


def test_key_limits_apply_to_that_key_only(sim, tmp_path):
    tight, loose = generate_key(), generate_key()
    tenant = {"name": "K", "tier": "enterprise", "keys": [
        {"name": "tight", "sha256": hash_key(tight), "limits": {"requests_per_minute": 2}},
        {"name": "loose", "sha256": hash_key(loose)}]}
    gateway = GatewayProcess(_config(tmp_path / "c", sim.url, {_unique("keys"): tenant}))
    try:
        _away_from_minute_edge()
        assert [_call(gateway.client(tight))[0] for _ in range(3)] == [200, 200, 429]
        assert [_call(gateway.client(loose))[0] for _ in range(3)] == [200, 200, 200]
    finally:
        gateway.stop()


def test_a_limit_of_zero_says_no_request_can_pass(sim, tmp_path):
    keys = {name: generate_key() for name in ("rpm", "concurrent", "daily")}
    gateway = GatewayProcess(_config(tmp_path / "c", sim.url, {
        _unique("zero-rpm"): _tenant(keys["rpm"], requests_per_minute=0),
        _unique("zero-concurrent"): _tenant(keys["concurrent"], concurrent_requests=0),
        _unique("zero-daily"): _tenant(keys["daily"], calls_per_day=0)}))
    try:
        for name, key in keys.items():
            with pytest.raises(openai.RateLimitError) as caught:
                gateway.client(key).chat.completions.create(model="small", messages=HELLO)
            message = caught.value.body["message"]
            assert "is 0" in message and "None" not in message and "Retry" not in message, (name, message)
            assert "retry-after" not in caught.value.response.headers, name
    finally:
        gateway.stop()


def test_budget_is_never_overspent_under_concurrency(sim, stores, tmp_path):
    key, tenant = generate_key(), _unique("budget")
    # $1 and $2 per million tokens; each request may cost up to ~12 + 50 tokens: about $0.000112 at worst.
    config = _config(tmp_path / "c", sim.url, {tenant: _tenant(key, monthly_budget_usd=0.002)})
    gateway = GatewayProcess(config)
    sim.control(ttft_ms=50.0)
    try:
        client = gateway.client(key)
        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            results = list(pool.map(lambda _: _call(client, extra_body={"max_tokens": 50}), range(60)))
    finally:
        gateway.stop()
    statuses = [status for status, _ in results]
    assert 200 in statuses and 429 in statuses
    assert all(h["code"] == "insufficient_quota" for s, h in results if s == 429)
    spent = stores.query("SELECT coalesce(sum(cost_usd), 0) AS spent, count(*) FILTER (WHERE status = 200) AS ok "
                         "FROM usage_ledger WHERE tenant_id = $1", tenant)[0]
    assert spent["ok"] == statuses.count(200)
    assert float(spent["spent"]) <= 0.002


def test_redis_down_serves_unlimited_then_recovers(sim, stores, tmp_path):
    key = generate_key()
    gateway = GatewayProcess(_config(tmp_path / "c", sim.url, {_unique("down"): _tenant(key)}))
    try:
        client = gateway.client(key)
        assert "x-ratelimit-limit-requests" in _call(client)[1]
        stores.stop_redis()
        try:
            # counted from the worker's lease while it lasts (it was counted in Redis), then not counted
            deadline = time.monotonic() + 5
            while True:
                status, headers = _call(client)
                assert status == 200
                if "x-ratelimit-limit-requests" not in headers:
                    break
                assert time.monotonic() < deadline, "requests were said counted long after Redis went away"
                time.sleep(0.1)
            _, metrics = http_request(gateway.port, "GET", "/metrics")
            assert b"gateway_redis_up 0.0" in metrics
        finally:
            stores.start_redis()
        deadline = time.monotonic() + 10
        while "x-ratelimit-limit-requests" not in _call(client)[1]:
            assert time.monotonic() < deadline, "limits were not counted again after Redis came back"
            time.sleep(0.3)
        # Said reachable again once nothing has failed for a few seconds (a half-failed cluster must not flap)
        while not any("Redis reachable again" in line.get("message", "") for line in gateway.log_lines()):
            assert time.monotonic() < deadline + 5, "Redis was never said reachable again"
            time.sleep(0.3)
        messages = [line.get("message", "") for line in gateway.log_lines()]
        assert any("Redis unreachable" in m for m in messages)
        assert any(line.get("limits_degraded") for line in gateway.log_lines())
    finally:
        gateway.stop()


def test_redis_down_refuses_when_configured_closed(sim, stores, tmp_path):
    key = generate_key()
    gateway = GatewayProcess(_config(tmp_path / "c", sim.url, {_unique("closed"): _tenant(key)}),
                             env={"GATEWAY_REDIS_FAILURE_MODE": "closed"})
    try:
        stores.stop_redis()
        try:
            status, headers = _call(gateway.client(key))
            assert status == 503 and headers["code"] == "limits_unavailable"
        finally:
            stores.start_redis()
    finally:
        gateway.stop()


def test_tenant_system_prompt_comes_first(sim, tmp_path):
    key = generate_key()
    tenant = _tenant(key)
    tenant["system_prompt"] = "You are Acme's support assistant."
    gateway = GatewayProcess(_config(tmp_path / "c", sim.url, {_unique("prompt"): tenant}))
    try:
        gateway.client(key).chat.completions.create(
            model="small", messages=[{"role": "system", "content": "Be brief."}, *HELLO])
        messages = sim.last_request()["messages"]
        assert messages[0] == {"role": "system", "content": "You are Acme's support assistant."}
        assert messages[1] == {"role": "system", "content": "Be brief."} and messages[2] == HELLO[0]
    finally:
        gateway.stop()


def test_unknown_tier_is_a_config_error(sim, tmp_path):
    from gateway.config.loader import load_config
    from gateway.config.yaml_source import ConfigError

    config = _config(tmp_path / "c", sim.url, {"t": {"name": "T", "tier": "platinum"}})
    with pytest.raises(ConfigError) as caught:
        load_config(config)
    assert "tenants.yaml, line" in caught.value.problems[0] and "unknown tier 'platinum'" in caught.value.problems[0]

"""A tenant's end users: limits and a budget per user, exact across replicas, and usage reported by user."""

from __future__ import annotations

import concurrent.futures
import json
import time

import pytest

from conftest import GatewayProcess, http_request
from gateway.config.keys import generate_key, hash_key
from test_limits import _away_from_minute_edge, _config

ADMIN_KEY = "sk-admin-end-users-0123456789abcdef"


def _tenant(key: str, **end_users) -> dict:
    return {"name": "T", "tier": "enterprise", "end_users": end_users, "keys": [{"name": "k", "sha256": hash_key(key)}]}


def _ask(gateway, key: str, user: str | None = None, header: str | None = None, **extra) -> tuple[int, dict]:
    body = {"model": "small", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, **extra}
    if user is not None:
        body["user"] = user
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    if header is not None:
        headers["X-OpenWebUI-User-Id"] = header
    return http_request(gateway.port, "POST", "/v1/chat/completions", json.dumps(body).encode(), headers)


@pytest.fixture
def tenants(sim, tmp_path, stores):
    keys = {name: generate_key() for name in ("acme", "strict", "thrifty")}
    config = _config(tmp_path / "c", sim.url, {
        "acme": _tenant(keys["acme"], limits={"requests_per_minute": 2, "tokens_per_day": 5000},
                        users={"alice@acme.test": {"requests_per_minute": 4}}),
        "strict": _tenant(keys["strict"], required=True),
        "thrifty": _tenant(keys["thrifty"], limits={"monthly_budget_usd": 0.00002}),
    })
    database_url = stores.new_database("end_users")
    gateways = [GatewayProcess(config, env={"GATEWAY_ADMIN_KEY": ADMIN_KEY, "DATABASE_URL": database_url})]
    try:
        gateways.append(GatewayProcess(config, env={"GATEWAY_ADMIN_KEY": ADMIN_KEY, "DATABASE_URL": database_url}))
        yield gateways, keys, database_url
    finally:
        for gateway in gateways:
            gateway.stop()


def test_each_end_user_has_its_own_limits(tenants):
    (gateway, _), keys, _ = tenants
    key = keys["acme"]
    _away_from_minute_edge()
    assert [_ask(gateway, key, "bob")[0] for _ in range(2)] == [200, 200]
    status, body = _ask(gateway, key, "bob")
    assert status == 429 and "requests per minute of this end user" in body["error"]["message"]
    assert [_ask(gateway, key, header="bob")[0] for _ in range(1)] == [429]  # Open WebUI's header: the same user
    assert [_ask(gateway, key, "alice@acme.test")[0] for _ in range(5)] == [200, 200, 200, 200, 429]
    assert [_ask(gateway, key)[0] for _ in range(3)] == [200, 200, 200]  # no end user named: the tenant's limits
    status, body = _ask(gateway, key, "carol", max_tokens=6000)
    assert status == 429 and "tokens per day of this end user" in body["error"]["message"]
    status, body = _ask(gateway, key, "carol\u0000" + "x" * 400)  # cut to 256 characters, NUL replaced: still one user
    assert status == 200


def test_end_user_limits_are_exact_across_replicas(tenants):
    gateways, keys, _ = tenants
    _away_from_minute_edge(20)
    user = f"burst-{time.time_ns()}"
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(lambda i: _ask(gateways[i % 2], keys["acme"], user)[0], range(16)))
    assert sorted(statuses) == [200, 200] + [429] * 14


def test_an_end_users_budget_and_a_required_end_user(tenants):
    (gateway, _), keys, _ = tenants
    assert _ask(gateway, keys["thrifty"], "dave")[0] == 200
    statuses = [_ask(gateway, keys["thrifty"], "dave") for _ in range(5)]
    refused = [body for status, body in statuses if status == 429]
    assert refused and refused[0]["error"]["code"] == "insufficient_quota"
    assert "monthly budget of this end user" in refused[0]["error"]["message"]
    assert _ask(gateway, keys["thrifty"], "erin")[0] == 200  # another user's budget is its own
    status, body = _ask(gateway, keys["strict"])
    assert status == 400 and body["error"]["code"] == "end_user_required" and body["error"]["param"] == "user"
    assert _ask(gateway, keys["strict"], "frank")[0] == 200
    assert _ask(gateway, keys["strict"], header="grace")[0] == 200


def test_usage_is_reported_by_end_user(tenants):
    (gateway, _), keys, _ = tenants
    key = keys["thrifty"]
    for user, count in (("heidi", 2), ("ivan", 1)):
        for _ in range(count):
            assert _ask(gateway, key, user)[0] in (200, 429)
    _ask(gateway, key)  # no end user: in the totals, not by user
    deadline = time.monotonic() + 10
    while True:
        status, report = http_request(gateway.port, "GET", "/v1/usage", headers={"Authorization": f"Bearer {key}"})
        assert status == 200, report
        users = {row["user"]: row for row in report["by_user"]}
        if {"heidi", "ivan"} <= set(users) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert users["heidi"]["requests"] == 2 and users["ivan"]["requests"] == 1
    assert report["end_users"] == len(users) and report["requests"] > sum(r["requests"] for r in users.values())
    status, admin_view = http_request(gateway.port, "GET", "/api/v1/organizations/thrifty/usage",
                                      headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert status == 200 and {"heidi", "ivan"} <= {row["user"] for row in admin_view["by_user"]}


def test_end_user_limits_through_the_admin_api(tenants):
    (gateway, _), _, _ = tenants
    headers = {"Authorization": f"Bearer {ADMIN_KEY}", "Content-Type": "application/json"}
    status, made = http_request(gateway.port, "POST", "/api/v1/organizations", json.dumps({
        "id": "made", "name": "Made", "end_users": {"limits": {"requests_per_minute": 1}}}).encode(), headers)
    assert status == 201 and made["end_users"]["limits"]["requests_per_minute"] == 1
    status, key = http_request(gateway.port, "POST", "/api/v1/organizations/made/keys", b"{}", headers)
    _away_from_minute_edge()
    assert [_ask(gateway, key["key"], "judy")[0] for _ in range(2)] == [200, 429]
    for bad in ({"users": {"": {}}}, {"users": {"a\u0000": {}}}, {"limits": {"tokens_per_day": -1}},
                {"limits": {"monthly_budget_usd": 10**12}}, {"required": "yes"}, {"limits": {"per_second": 1}}):
        status, body = http_request(gateway.port, "PATCH", "/api/v1/organizations/made",
                                    json.dumps({"end_users": bad}).encode(), headers)
        assert status == 400 and body["error"]["param"].startswith("end_users"), (bad, body)

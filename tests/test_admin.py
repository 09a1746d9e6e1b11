"""The admin API behind its own key, tenants and keys kept in PostgreSQL, and the usage reports."""

from __future__ import annotations

import json
import re
import time

import openai
import pytest
import yaml

from conftest import GatewayProcess, http_request
from gateway.config.keys import generate_key, hash_key
from gateway.config.schema import TENANT_ID_PATTERN
from test_limits import _config

ADMIN_KEY = "sk-admin-test-0123456789abcdef"
HELLO = [{"role": "user", "content": "hi"}]


@pytest.fixture
def admin_setup(sim, tmp_path, stores):
    tenant_key = generate_key()
    config = _config(tmp_path / "c", sim.url, {"yaml-tenant": {
        "name": "From the file", "tier": "professional", "keys": [{"name": "file-key", "sha256": hash_key(tenant_key)}]}},
        models={
            "small": {"size": "small", "pricing": {"input_per_million": 0.15, "output_per_million": 0.6},
                      "deployments": [{"name": "s", "api_base": f"{sim.url}/v1", "model": "sim-s"}]},
            "large": {"size": "large", "pricing": {"input_per_million": 2.5, "output_per_million": 10},
                      "deployments": [{"name": "l", "api_base": f"{sim.url}/v1", "model": "sim-l"}]},
        })
    models = yaml.safe_load((config / "models.yaml").read_text())
    models["defaults"] = {"reference_model": "large"}
    (config / "models.yaml").write_text(yaml.safe_dump(models))
    # a database of its own: the tenants its tests (and schemathesis) make are seen by no other test's gateway
    database_url = stores.new_database("admin")
    gateway = GatewayProcess(config, env={"GATEWAY_ADMIN_KEY": ADMIN_KEY, "DATABASE_URL": database_url})
    gateway.database_url = database_url
    yield gateway, tenant_key, config
    gateway.stop()


def _admin(gateway, method: str, path: str, body=None, key: str = ADMIN_KEY):
    payload = json.dumps(body).encode() if body is not None and not isinstance(body, bytes) else body
    return http_request(gateway.port, method, path, payload,
                        {"Authorization": f"Bearer {key}", "Content-Type": "application/json"})


def test_admin_api_needs_an_admin_key(admin_setup):
    gateway, tenant_key, _ = admin_setup
    status, body = http_request(gateway.port, "GET", "/api/v1/organizations")
    assert status == 401 and body["error"]["code"] == "missing_api_key"
    status, body = _admin(gateway, "GET", "/api/v1/organizations", key="sk-wrong")
    assert status == 401
    status, body = _admin(gateway, "GET", "/api/v1/organizations", key=tenant_key)
    assert status == 403 and body["error"]["code"] == "admin_key_required"
    status, body = _admin(gateway, "GET", "/api/v1/organizations/yaml-tenant/usage", key=tenant_key)
    assert status == 403


def test_tenants_made_through_the_api_work_persist_and_reach_other_replicas(admin_setup, stores):
    gateway, _, config = admin_setup
    status, tenant = _admin(gateway, "POST", "/api/v1/organizations", {
        "organization_name": "Acme Corp", "industry": "tech", "subscription_tier": "professional",
        "models": ["small"], "limits": {"requests_per_minute": 100}})
    assert status == 201, tenant
    assert tenant["tier"] == "professional" and tenant["limits"]["requests_per_minute"] == 100
    assert tenant["limits"]["calls_per_day"] == 10_000 and "analytics" in tenant["features"]
    assert tenant["source"] == "api" and tenant["allowed_models"] == ["small"]
    tenant_id = tenant["id"]
    status, made = _admin(gateway, "POST", f"/api/v1/organizations/{tenant_id}/keys", {"name": "backend"})
    assert status == 201 and made["key"].startswith("sk-gw-")
    key = made["key"]
    assert gateway.client(key).chat.completions.create(model="small", messages=HELLO).choices
    with pytest.raises(openai.NotFoundError):
        gateway.client(key).chat.completions.create(model="large", messages=HELLO)
    stored = stores.query_in(gateway.database_url, "SELECT sha256 FROM api_keys WHERE tenant_id = $1", tenant_id)
    assert stored[0]["sha256"] == hash_key(key)
    every_key = stores.query_in(gateway.database_url, "SELECT * FROM api_keys")
    assert key not in json.dumps([dict(r) for r in every_key], default=str)
    assert key not in gateway.log_path.read_text()

    replica = GatewayProcess(config, env={"GATEWAY_ADMIN_KEY": ADMIN_KEY, "DATABASE_URL": gateway.database_url})
    try:
        assert replica.client(key).chat.completions.create(model="small", messages=HELLO).choices
        status, _ = _admin(gateway, "DELETE", f"/api/v1/organizations/{tenant_id}/keys/backend")
        assert status == 200
        deadline = time.monotonic() + 5
        while True:  # the replica learns of the revocation by polling
            try:
                replica.client(key).models.list()
            except openai.AuthenticationError:
                break
            assert time.monotonic() < deadline, "a revoked key still works on the other replica"
            time.sleep(0.2)
    finally:
        replica.stop()

    gateway.stop()
    restarted = GatewayProcess(config, env={"GATEWAY_ADMIN_KEY": ADMIN_KEY, "DATABASE_URL": gateway.database_url})
    try:
        status, body = _admin(restarted, "GET", f"/api/v1/organizations/{tenant_id}")
        assert status == 200 and body["name"] == "Acme Corp"
        status, body = _admin(restarted, "PATCH", f"/api/v1/organizations/{tenant_id}", {"tier": "enterprise"})
        assert status == 200 and body["tier"] == "enterprise" and body["limits"]["requests_per_minute"] == 100
        status, body = _admin(restarted, "DELETE", f"/api/v1/organizations/{tenant_id}")
        assert status == 200
        assert _admin(restarted, "GET", f"/api/v1/organizations/{tenant_id}")[0] == 404
    finally:
        restarted.stop()


def test_a_key_made_on_one_replica_works_at_once_on_another_under_a_burst(admin_setup, tmp_path):
    import concurrent.futures

    gateway, _, config = admin_setup
    status, tenant = _admin(gateway, "POST", "/api/v1/organizations", {"name": "Bursty", "tier": "enterprise"})
    assert status == 201, tenant
    replica = GatewayProcess(config, env={"GATEWAY_ADMIN_KEY": ADMIN_KEY, "DATABASE_URL": gateway.database_url,
                                          "GATEWAY_RELOAD_INTERVAL": "60",
                                          "GATEWAY_DATA_DIR": str(tmp_path / "replica-data")})
    try:
        time.sleep(1.2)  # the replica's last look for keys is over a second old
        status, made = _admin(gateway, "POST", f"/api/v1/organizations/{tenant['id']}/keys", {"name": "burst"})
        assert status == 201
        headers = {"Authorization": f"Bearer {made['key']}", "Content-Type": "application/json"}
        body = json.dumps({"model": "small", "messages": HELLO, "max_tokens": 2}).encode()
        with concurrent.futures.ThreadPoolExecutor(50) as pool:
            statuses = list(pool.map(lambda _: http_request(replica.port, "POST", "/v1/chat/completions", body,
                                                            headers)[0], range(50)))
        assert statuses == [200] * 50  # those that came while the replica looked for the key waited for it
    finally:
        replica.stop()


def test_bad_admin_input_gets_a_clear_4xx(admin_setup):
    gateway, _, _ = admin_setup
    cases = [
        ({"name": "X", "tier": "platinum"}, 400, "tier"),
        ({"name": "X", "colour": "blue"}, 400, "colour"),
        ({"tier": "basic"}, 400, "name"),
        ({"name": "X", "limits": {"requests_per_minute": "many"}}, 400, "limits.requests_per_minute"),
        ({"name": "X", "id": "Bad Id!"}, 400, "id"),
        ({"name": "X", "features": ["teleport"]}, 400, "features.0"),
        ({"name": "   "}, 400, "name"),
        ({"name": "X", "routing": {"profile": "nope"}}, 400, "routing.profile"),
        ({"name": "X", "routing": {"complex": "ghost"}}, 400, "routing.complex"),
        ({"name": "X", "routing": {"cascade_threshold": 2}}, 400, "routing.cascade_threshold"),
        ({"name": "X", "cache": {"ttl_seconds": 0}}, 400, "cache.ttl_seconds"),
        (b"{not json", 400, None),
        ({"name": "X", "id": "yaml-tenant"}, 409, "id"),
    ]
    for body, status, param in cases:
        got, answer = _admin(gateway, "POST", "/api/v1/organizations", body)
        assert got == status, (body, answer)
        assert answer["error"]["param"] == param, (body, answer)
        assert answer["error"]["message"]
    for body in (b"{not json", b'{"name": "X", "limits": ' + b'{"a": ' * 3000 + b'1' + b'}' * 3001):
        status, answer = _admin(gateway, "POST", "/api/v1/organizations", body)
        assert status == 400 and answer["error"]["code"] == "invalid_json", answer
        assert "not valid JSON" in answer["error"]["message"], answer
    status, made = _admin(gateway, "POST", "/api/v1/organizations", {"name": "Typo", "models": ["small", "smal"]})
    assert status == 201 and made["allowed_models"] == ["small"], made  # a model may be added to models.yaml later
    assert made["warnings"] == ["'smal' admits no model of this gateway: the tenant cannot use it"]
    status, fixed = _admin(gateway, "PATCH", f"/api/v1/organizations/{made['id']}", {"models": ["small*"]})
    assert status == 200 and fixed["warnings"] == [], fixed
    status, _ = _admin(gateway, "POST", "/api/v1/organizations", {"name": "Twice", "id": "twice"})
    assert status == 201
    status, answer = _admin(gateway, "POST", "/api/v1/organizations", {"name": "Twice", "id": "twice"})
    assert status == 409 and answer["error"]["code"] == "tenant_exists"
    status, answer = _admin(gateway, "PATCH", "/api/v1/organizations/yaml-tenant", {"tier": "basic"})
    assert status == 409 and answer["error"]["code"] == "declared_in_file"
    status, answer = _admin(gateway, "DELETE", "/api/v1/organizations/yaml-tenant/keys/file-key")
    assert status == 409
    status, answer = _admin(gateway, "GET", "/api/v1/organizations/nobody")
    assert status == 404 and answer["error"]["code"] == "tenant_not_found"
    status, answer = _admin(gateway, "POST", "/api/v1/organizations/twice/keys", {"expires": "someday"})
    assert status == 400 and answer["error"]["param"] == "expires"
    status, answer = _admin(gateway, "POST", "/api/v1/organizations/twice/keys", {"expires": "2020-01-01"})
    assert status == 400 and answer["error"]["param"] == "expires" and "past" in answer["error"]["message"]
    status, made = _admin(gateway, "POST", "/api/v1/organizations", {"name": "Ünïcode 🙂 Café"})
    assert status == 201 and re.fullmatch(TENANT_ID_PATTERN, made["id"]) and made["id"].startswith("unicode-cafe-")
    status, _ = _admin(gateway, "GET", f"/api/v1/requests?tenant={made['id']}")
    assert status == 200


def test_routing_of_a_tenant_made_through_the_api(admin_setup):
    gateway, _, _ = admin_setup
    status, made = _admin(gateway, "POST", "/api/v1/organizations",
                          {"name": "Routed", "id": "routed", "routing": {"complex": "small", "cascade": False}})
    assert status == 201, made
    assert made["routing"]["auto"]["models"]["complex"] == "small" and made["routing"]["auto"]["cascade"] is False
    status, key = _admin(gateway, "POST", "/api/v1/organizations/routed/keys", {"name": "k"})
    raw = gateway.client(key["key"]).chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "Our replication architecture failed: analyze the root cause, then "
                                                  "debug it step by step, compare each trade-off, and recommend "
                                                  "exactly three changes"}])
    assert raw.headers["x-gateway-model"] == "small" and raw.headers["x-gateway-complexity"] == "complex"
    status, report = _admin(gateway, "GET", "/api/v1/organizations/routed/routing")
    assert status == 200 and report["object"] == "routing_report"


def test_cache_policy_of_a_tenant_made_through_the_api(admin_setup):
    gateway, _, _ = admin_setup
    status, made = _admin(gateway, "POST", "/api/v1/organizations",
                          {"name": "Cached", "id": "cached", "cache": {"nondeterministic": True, "ttl_seconds": 60}})
    assert status == 201 and made["cache"] == {"nondeterministic": True, "ttl_seconds": 60}
    status, key = _admin(gateway, "POST", "/api/v1/organizations/cached/keys", {"name": "k"})
    client = gateway.client(key["key"])
    ask = lambda: client.chat.completions.with_raw_response.create(  # noqa: E731
        model="small", messages=[{"role": "user", "content": "cache me, loosely"}], temperature=0.8).headers
    assert ask()["x-gateway-cache"] == "miss"
    deadline = time.monotonic() + 5
    while ask()["x-gateway-cache"] != "hit":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    status, patched = _admin(gateway, "PATCH", "/api/v1/organizations/cached", {"cache": {"enabled": False}})
    assert status == 200 and patched["cache"] == {"enabled": False}
    assert ask()["x-gateway-cache"] == "bypass; off"


def test_usage_reports_for_the_tenant_and_the_admin(admin_setup):
    gateway, tenant_key, _ = admin_setup
    client = gateway.client(tenant_key)
    for model in ("small", "small", "small", "large"):
        client.chat.completions.create(model=model, messages=HELLO, max_tokens=10)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="absent", messages=HELLO)
    deadline = time.monotonic() + 5
    while True:
        status, own = http_request(gateway.port, "GET", "/v1/usage", headers={"Authorization": f"Bearer {tenant_key}"})
        if status == 200 and own["requests"] >= 5 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert status == 200 and own["tenant"] == "yaml-tenant"
    assert own["requests"] == 5 and own["answered"] == 4 and own["refused_or_failed"] == 1
    assert own["completion_tokens"] == 40 and own["small_model_share"] == 0.75
    assert {row["model"]: row["requests"] for row in own["by_model"]} == {"small": 3, "large": 1}
    assert own["by_day"][0]["requests"] == 5
    savings = own["savings"]
    assert savings["reference_model"] == "large" and 0 < savings["saved_share"] < 1
    assert abs(savings["reference_cost_usd"] - savings["saved_usd"] - own["cost_usd"]) < 1e-9
    status, seen_by_admin = _admin(gateway, "GET", "/api/v1/organizations/yaml-tenant/usage")
    assert status == 200 and seen_by_admin["requests"] == own["requests"]
    status, error = http_request(gateway.port, "GET", "/v1/usage?start=2026-02-01&end=2026-01-01",
                                 headers={"Authorization": f"Bearer {tenant_key}"})
    assert status == 400 and error["error"]["param"] == "end"
    status, error = http_request(gateway.port, "GET", "/v1/usage")
    assert status == 401

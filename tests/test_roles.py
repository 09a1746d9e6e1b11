"""Keys with roles and limits: a key limited to routes, models and tools; a tenant_admin key that manages its own
tenant and nothing of another's; a viewer key that reads usage and requests; the audit log of every admin change."""

from __future__ import annotations

import json
import time

import openai
import pytest
import yaml

from conftest import GatewayProcess, http_request
from gateway.config.keys import generate_key, hash_key
from test_limits import _config

ADMIN_KEY = "sk-admin-roles-0123456789abcdef"
HELLO = [{"role": "user", "content": "hi"}]
TOOL = {"type": "function", "function": {"name": "search_docs", "parameters": {"type": "object", "properties": {}}}}
OTHER_TOOL = {"type": "function", "function": {"name": "delete_everything",
                                               "parameters": {"type": "object", "properties": {}}}}


@pytest.fixture
def roles(sim, tmp_path, stores):
    keys = {name: generate_key() for name in ("chat_only", "small_only", "tools", "viewer", "yaml_admin", "other")}
    config = _config(tmp_path / "c", sim.url, {
        "acme": {"name": "Acme", "tier": "professional", "keys": [
            {"name": "chat-only", "sha256": hash_key(keys["chat_only"]), "routes": ["chat"]},
            {"name": "small-only", "sha256": hash_key(keys["small_only"]), "models": ["small"]},
            {"name": "tools", "sha256": hash_key(keys["tools"]), "tools": ["search_*"]},
            {"name": "viewer", "sha256": hash_key(keys["viewer"]), "role": "viewer"},
            {"name": "admin", "sha256": hash_key(keys["yaml_admin"]), "role": "tenant_admin"}]},
        "other": {"name": "Other", "keys": [{"name": "k", "sha256": hash_key(keys["other"])}]},
    }, models={
        "small": {"deployments": [{"name": "s", "api_base": f"{sim.url}/v1", "model": "sim-s"}]},
        "large": {"deployments": [{"name": "l", "api_base": f"{sim.url}/v1", "model": "sim-l"}]},
        "embed": {"type": "embedding", "deployments": [{"name": "e", "api_base": f"{sim.url}/v1", "model": "sim-e"}]},
    })
    gateway = GatewayProcess(config, env={"GATEWAY_ADMIN_KEY": ADMIN_KEY,
                                          "DATABASE_URL": stores.new_database("roles")})
    gateway.keys = keys
    yield gateway
    gateway.stop()


def _call(gateway, method: str, path: str, key: str, body=None):
    payload = json.dumps(body).encode() if body is not None else None
    return http_request(gateway.port, method, path, payload,
                        {"Authorization": f"Bearer {key}", "Content-Type": "application/json"})


def _api_tenant(gateway) -> tuple[str, str]:
    """A tenant made through the admin API, and a tenant_admin key of it."""
    status, made = _call(gateway, "POST", "/api/v1/organizations", ADMIN_KEY,
                         {"id": "made", "name": "Made", "tier": "professional"})
    assert status == 201, made
    status, key = _call(gateway, "POST", "/api/v1/organizations/made/keys", ADMIN_KEY,
                        {"name": "boss", "role": "tenant_admin"})
    assert status == 201 and key["role"] == "tenant_admin", key
    return "made", key["key"]


def test_a_key_limited_to_routes_models_and_tools(roles):
    keys = roles.keys
    chat_only = roles.client(keys["chat_only"])
    assert chat_only.chat.completions.create(model="large", messages=HELLO).choices
    with pytest.raises(openai.PermissionDeniedError) as refused:
        chat_only.embeddings.create(model="embed", input="x")
    assert refused.value.body["code"] == "route_not_allowed" and "embeddings" in refused.value.body["message"]
    status, body = _call(roles, "GET", "/v1/usage", keys["chat_only"])
    assert status == 403 and body["error"]["code"] == "route_not_allowed"
    assert chat_only.models.list().data  # listing models is every key's

    small_only = roles.client(keys["small_only"])
    assert small_only.chat.completions.create(model="small", messages=HELLO).choices
    with pytest.raises(openai.PermissionDeniedError) as refused:
        small_only.chat.completions.create(model="large", messages=HELLO)
    assert refused.value.body["code"] == "model_not_allowed" and refused.value.body["param"] == "model"
    assert [m.id for m in small_only.models.list().data] == ["small"]
    with pytest.raises(openai.NotFoundError):
        small_only.models.retrieve("large")
    status, body = _call(roles, "POST", "/v1/messages/count_tokens", keys["small_only"],
                         {"model": "large", "messages": HELLO})
    assert status == 403, body

    tools = roles.client(keys["tools"])
    assert tools.chat.completions.create(model="small", messages=HELLO, tools=[TOOL]).choices
    with pytest.raises(openai.BadRequestError) as refused:
        tools.chat.completions.create(model="small", messages=HELLO, tools=[TOOL, OTHER_TOOL])
    assert "key-tools" in refused.value.body["message"] or "may not offer" in refused.value.body["message"]
    assert "delete_everything" not in refused.value.body["message"]


def test_a_viewer_reads_usage_and_requests_only(roles):
    keys = roles.keys
    roles.client(keys["chat_only"]).chat.completions.create(model="small", messages=HELLO)
    viewer = roles.client(keys["viewer"])
    with pytest.raises(openai.PermissionDeniedError) as refused:
        viewer.chat.completions.create(model="small", messages=HELLO)
    assert refused.value.body["code"] == "route_not_allowed" and "viewer" in refused.value.body["message"]
    assert _call(roles, "GET", "/v1/usage", keys["viewer"])[0] == 200
    status, account = _call(roles, "GET", "/v1/account", keys["viewer"])
    assert status == 200 and account["key"]["role"] == "viewer"
    assert _call(roles, "GET", "/api/v1/organizations/acme/usage", keys["viewer"])[0] == 200
    deadline = time.monotonic() + 5
    while True:
        status, page = _call(roles, "GET", "/api/v1/requests", keys["viewer"])
        assert status == 200, page
        if page["data"] or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert page["data"] and {row["tenant_id"] for row in page["data"]} == {"acme"}
    for method, path in (("GET", "/api/v1/organizations/acme"), ("GET", "/api/v1/organizations/acme/keys"),
                         ("POST", "/api/v1/organizations/acme/keys"), ("GET", "/api/v1/audit"),
                         ("GET", "/api/v1/status"), ("GET", "/api/v1/usage")):
        status, body = _call(roles, method, path, keys["viewer"], {} if method == "POST" else None)
        assert status == 403 and body["error"]["code"] == "permission_denied", (path, body)
    status, body = _call(roles, "GET", "/api/v1/organizations/other/usage", keys["viewer"])
    assert status == 404 and body["error"]["code"] == "tenant_not_found"
    status, body = _call(roles, "GET", "/api/v1/requests?tenant=other", keys["viewer"])
    assert status == 404
    # a member key is no admin of anything
    status, body = _call(roles, "GET", "/api/v1/organizations/acme/usage", keys["chat_only"])
    assert status == 403 and body["error"]["code"] == "admin_key_required"


def test_a_tenant_admin_manages_its_own_tenant_and_nothing_else(roles):
    tenant, boss = _api_tenant(roles)
    path = f"/api/v1/organizations/{tenant}"
    status, listed = _call(roles, "GET", "/api/v1/organizations", boss)
    assert status == 200 and [t["id"] for t in listed["data"]] == [tenant]
    # settings within its tier
    status, changed = _call(roles, "PATCH", path, boss, {"system_prompt": "Be brief.",
                                                         "limits": {"requests_per_minute": 10}})
    assert status == 200 and changed["system_prompt"] == "Be brief." and changed["limits"]["requests_per_minute"] == 10
    status, body = _call(roles, "PATCH", path, boss, {"limits": {"requests_per_minute": 10**9}})
    assert status == 403 and body["error"]["code"] == "limit_above_tier" and body["error"]["param"] == (
        "limits.requests_per_minute")
    for field, value in (("tier", "enterprise"), ("enabled", False), ("models", ["*"]), ("features", []),
                         ("provider_keys", {"openai": "env:OPENAI_API_KEY"})):
        status, body = _call(roles, "PATCH", path, boss, {field: value})
        assert status == 403 and body["error"]["param"] == field, (field, body)
    status, body = _call(roles, "PATCH", path, boss, {"adapters": {"x": {"base": "small", "path": "/adapters/acme"}}})
    assert status == 403 and body["error"]["param"] == "adapters.x"
    status, body = _call(roles, "PATCH", path, boss, {"guardrails": [{"name": "no-cards", "check": "payment_card"}]})
    assert status == 200 and body["guardrails"][0]["name"] == "no-cards"
    # its keys
    status, made = _call(roles, "POST", f"{path}/keys", boss, {"name": "app", "routes": ["chat"], "models": ["small"]})
    assert status == 201 and made["routes"] == ["chat"] and made["models"] == ["small"]
    app = roles.client(made["key"])
    assert app.chat.completions.create(model="small", messages=HELLO).choices
    status, listed = _call(roles, "GET", f"{path}/keys", boss)
    assert {k["name"]: k["role"] for k in listed["data"]} == {"boss": "tenant_admin", "app": "member"}
    assert _call(roles, "DELETE", f"{path}/keys/app", boss)[0] == 200
    with pytest.raises(openai.AuthenticationError):
        app.chat.completions.create(model="small", messages=HELLO)
    # nothing of another tenant, nothing of the operator's
    for method, other in (("GET", "/api/v1/organizations/acme"), ("PATCH", "/api/v1/organizations/acme"),
                          ("GET", "/api/v1/organizations/acme/keys"), ("POST", "/api/v1/organizations/acme/keys"),
                          ("DELETE", "/api/v1/organizations/acme/cache"),
                          ("GET", "/api/v1/audit?tenant=acme"), ("GET", "/api/v1/requests?tenant=acme")):
        status, body = _call(roles, method, other, boss, {} if method in ("POST", "PATCH") else None)
        assert status == 404 and body["error"]["code"] == "tenant_not_found", (other, body)
    for method, operator_only in (("POST", "/api/v1/organizations"), ("DELETE", path), ("GET", f"{path}/history"),
                                  ("GET", "/api/v1/usage"), ("GET", "/api/v1/status"), ("GET", "/api/v1/fleet"),
                                  ("POST", "/api/v1/router/scorers")):
        status, body = _call(roles, method, operator_only, boss, {} if method == "POST" else None)
        assert status == 403 and body["error"]["code"] == "permission_denied", (operator_only, body)
    # a tenant declared in tenants.yaml: its tenant_admin key reads, and changes stay in the file
    yaml_admin = roles.keys["yaml_admin"]
    assert _call(roles, "GET", "/api/v1/organizations/acme", yaml_admin)[0] == 200
    status, body = _call(roles, "PATCH", "/api/v1/organizations/acme", yaml_admin, {"system_prompt": "x"})
    assert status == 409 and body["error"]["code"] == "declared_in_file"
    assert _call(roles, "GET", f"{path}/usage", yaml_admin)[0] == 404


def test_every_admin_change_is_in_the_audit_log(roles):
    tenant, boss = _api_tenant(roles)
    path = f"/api/v1/organizations/{tenant}"
    assert _call(roles, "PATCH", path, boss, {"system_prompt": "Hello\u0000"})[0] == 400  # refused: not an action
    assert _call(roles, "PATCH", path, boss, {"system_prompt": "Be kind."})[0] == 200
    status, made = _call(roles, "POST", f"{path}/keys", ADMIN_KEY, {"name": "ops"})
    assert status == 201
    assert _call(roles, "DELETE", f"{path}/keys/ops", boss)[0] == 200
    status, log = _call(roles, "GET", f"/api/v1/audit?tenant={tenant}", ADMIN_KEY)
    assert status == 200, log
    entries = log["data"]
    assert [e["action"] for e in entries] == ["key.revoke", "key.create", "tenant.update", "key.create",
                                              "tenant.create"]
    revoke, create_key, update, _, create = entries
    assert revoke["actor"] == {"name": "boss", "role": "tenant_admin", "tenant": tenant}
    assert create_key["actor"] == {"name": "GATEWAY_ADMIN_KEY", "role": "operator", "tenant": None}
    assert update["before"]["system_prompt"] is None and update["after"]["system_prompt"] == "Be kind."
    assert create["before"] is None and create["after"]["id"] == tenant
    assert made["key"] not in json.dumps(log)  # a key is never in the log
    # the tenant_admin reads its own tenant's entries only
    status, own = _call(roles, "GET", "/api/v1/audit", boss)
    assert status == 200 and [e["id"] for e in own["data"]] == [e["id"] for e in entries]
    _call(roles, "PATCH", "/api/v1/organizations/other", ADMIN_KEY, {"name": "x"})  # 409 (yaml): no entry
    status, page = _call(roles, "GET", "/api/v1/audit?limit=2", ADMIN_KEY)
    assert page["has_more"] and len(page["data"]) == 2
    status, rest = _call(roles, "GET", f"/api/v1/audit?limit=10&before_id={page['data'][-1]['id']}", ADMIN_KEY)
    assert [e["action"] for e in rest["data"]] == ["tenant.update", "key.create", "tenant.create"]
    for bad in ("since=2026-13-01T00:00", "since=99999-01-01T00:00", "before_id=0", "before_id=99999999999999999999",
                "limit=100000", "tenant=%00"):
        assert _call(roles, "GET", f"/api/v1/audit?{bad}", ADMIN_KEY)[0] == 400, bad


def test_key_limits_are_checked_when_keys_are_made_and_when_tenants_yaml_is_read(roles, tmp_path):
    tenant, boss = _api_tenant(roles)
    for bad in ({"role": "owner"}, {"routes": ["images"]}, {"models": ["a\u0000"]}, {"tools": [""]},
                {"routes": "chat"}, {"models": ["x"] * 1001}):
        status, body = _call(roles, "POST", f"/api/v1/organizations/{tenant}/keys", boss, {"name": "bad", **bad})
        assert status == 400 and body["error"]["type"] == "invalid_request_error", (bad, body)
    tenants = yaml.safe_load((roles.config_dir / "tenants.yaml").read_text())
    tenants["tenants"]["acme"]["keys"][0]["role"] = "root"
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tenants.yaml").write_text(yaml.safe_dump(tenants))
    (broken / "models.yaml").write_text((roles.config_dir / "models.yaml").read_text())
    from gateway.config.loader import load_config
    from gateway.config.yaml_source import ConfigError

    with pytest.raises(ConfigError) as refused:
        load_config(broken)
    assert "tenants.yaml" in str(refused.value) and "role" in str(refused.value)

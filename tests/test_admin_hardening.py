"""The admin API accepts only what it can read back, never freezes on a bad row, and guards its door."""

from __future__ import annotations

import json
import socket
import time

import openai
import pytest
import yaml

from conftest import GatewayProcess, http_request
from gateway.config.keys import generate_key, hash_key
from test_admin import ADMIN_KEY, HELLO, _admin, admin_setup  # noqa: F401  (the fixture)


def _metric(gateway: GatewayProcess, name: str) -> float:
    _, text = http_request(gateway.port, "GET", "/metrics")
    for line in text.decode().splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no metric {name}")


def _make_tenant(gateway: GatewayProcess, tenant_id: str, **fields) -> str:
    status, made = _admin(gateway, "POST", "/api/v1/organizations", {"name": tenant_id, "id": tenant_id, **fields})
    assert status == 201, made
    status, key = _admin(gateway, "POST", f"/api/v1/organizations/{tenant_id}/keys", {"name": "k"})
    assert status == 201, key
    return key["key"]


def test_values_the_stores_cannot_read_back_are_refused(admin_setup):
    gateway, _, _ = admin_setup
    _make_tenant(gateway, "strict")
    cases = [
        ("POST", "/api/v1/organizations/strict/keys", {"name": "old", "expires": "0001-01-01"}, "expires"),
        ("POST", "/api/v1/organizations/strict/keys", {"name": "far", "expires": "99999-01-01"}, "expires"),
        ("POST", "/api/v1/organizations/strict/keys", {"name": "a/b"}, "name"),
        ("POST", "/api/v1/organizations/strict/keys", {"name": "nul\u0000"}, "name"),
        ("PATCH", "/api/v1/organizations/strict", {"limits": {"requests_per_minute": 1e23}},
         "limits.requests_per_minute"),
        ("PATCH", "/api/v1/organizations/strict", {"limits": {"tokens_per_minute": 10**19}},
         "limits.tokens_per_minute"),
        ("PATCH", "/api/v1/organizations/strict", {"limits": {"monthly_budget_usd": 1e300}},
         "limits.monthly_budget_usd"),
        ("PATCH", "/api/v1/organizations/strict", {"limits": {"requests_per_minute": True}},
         "limits.requests_per_minute"),
        ("PATCH", "/api/v1/organizations/strict", {"cache": {"nondeterministic": 0}}, "cache.nondeterministic"),
        ("PATCH", "/api/v1/organizations/strict", {"name": "a\u0000b"}, "name"),
        ("PATCH", "/api/v1/organizations/strict", {"system_prompt": "be\u0000nice"}, "system_prompt"),
        ("PATCH", "/api/v1/organizations/strict", {"models": ["gpt\u0000*"]}, "models"),
        ("PATCH", "/api/v1/organizations/strict", {"name": "x" * 201}, "name"),
        ("PATCH", "/api/v1/organizations/strict", {"cors_origins": ["not an origin"]}, "cors_origins.0"),
        ("POST", "/api/v1/organizations", {"name": "nul\u0000name"}, "name"),
    ]
    for method, path, body, param in cases:
        status, answer = _admin(gateway, method, path, body)
        assert status == 400, (body, answer)
        assert answer["error"]["param"] == param, (body, answer)
    # Nothing of that was stored: the directory still reads back, new tenants and keys still work.
    key = _make_tenant(gateway, "after-the-bad-input")
    assert gateway.client(key).chat.completions.create(model="small", messages=HELLO).choices


def test_one_unreadable_row_never_stops_the_others(admin_setup, stores):
    gateway, _, config = admin_setup
    good_key = _make_tenant(gateway, "good-before")
    # Rows written by hand (or by an older version) that the gateway cannot read back.
    bump = "WITH v AS (UPDATE api_changes SET version = version + 1 RETURNING version) "
    stores.query_in(gateway.database_url,
                    bump + "INSERT INTO api_tenants (id, spec, version) "
                    "SELECT 'broken', '{\"name\": 5}', version FROM v")
    stores.query_in(gateway.database_url, bump + "INSERT INTO api_tenants (id, spec, version) SELECT 'huge', "
                 "'{\"name\": \"H\", \"limits\": {\"requests_per_minute\": 1e23}}', version FROM v")
    stores.query_in(gateway.database_url, bump + "INSERT INTO api_keys (sha256, tenant_id, name, expires_at, version) "
                 "SELECT $1, 'good-before', 'ancient', '0001-01-01', version FROM v", "0" * 64)
    # The next change is read with them: it must still land, and so must revocations and new tenants.
    new_key = _make_tenant(gateway, "good-after")
    assert gateway.client(new_key).chat.completions.create(model="small", messages=HELLO).choices
    status, _ = _admin(gateway, "DELETE", "/api/v1/organizations/good-before/keys/k")
    assert status == 200
    with pytest.raises(openai.AuthenticationError):
        gateway.client(good_key).chat.completions.create(model="small", messages=HELLO)
    assert _metric(gateway, "gateway_directory_rows_rejected") == 2
    # An unreadable row can be repaired through the API: it says so, and can be deleted and made again
    status, answer = _admin(gateway, "PATCH", "/api/v1/organizations/broken", {"name": "Fixed"})
    assert status == 409 and answer["error"]["code"] == "tenant_unreadable", answer
    status, answer = _admin(gateway, "POST", "/api/v1/organizations", {"name": "Broken", "id": "broken"})
    assert status == 409 and answer["error"]["code"] == "tenant_unreadable", answer
    assert _admin(gateway, "DELETE", "/api/v1/organizations/huge")[0] == 200
    status, answer = _admin(gateway, "POST", "/api/v1/organizations", {"name": "Huge again", "id": "huge"})
    assert status == 201, answer
    assert _metric(gateway, "gateway_directory_rows_rejected") == 1
    restarted = GatewayProcess(config, env={"GATEWAY_ADMIN_KEY": ADMIN_KEY, "DATABASE_URL": gateway.database_url})
    try:
        assert restarted.client(new_key).chat.completions.create(model="small", messages=HELLO).choices
        assert _admin(restarted, "GET", "/api/v1/organizations/good-after")[0] == 200
        messages = [line.get("message", "") for line in restarted.log_lines()]
        assert any("'broken'" in m and "skipped" in m for m in messages)
    finally:
        restarted.stop()
        stores.query_in(gateway.database_url, "DELETE FROM api_tenants WHERE id IN ('broken', 'huge')")
        stores.query_in(gateway.database_url, "DELETE FROM api_keys WHERE name = 'ancient'")


def _raw_exchange(port: int, head: bytes, body: bytes = b"", timeout: float = 5.0) -> bytes:
    """Send ``head`` (and ``body``), then read what the gateway answers."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head + body)
        data = b""
        try:
            while b"\r\n\r\n" not in data or len(data) < data.find(b"\r\n\r\n") + 4 + _length(data):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        except socket.timeout:
            pass
        return data


def _length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":", 1)[1])
    return 0


def test_admin_key_is_checked_before_the_body_is_read(admin_setup):
    gateway, tenant_key, _ = admin_setup
    declared = 200 * 1024 * 1024
    for key, status in ((None, b"401"), ("sk-wrong", b"401"), (tenant_key, b"403")):
        auth = f"Authorization: Bearer {key}\r\n".encode() if key else b""
        started = time.monotonic()
        answer = _raw_exchange(gateway.port, b"POST /api/v1/organizations HTTP/1.1\r\nHost: x\r\n" + auth +
                               b"Content-Type: application/json\r\n" +
                               f"Content-Length: {declared}\r\n\r\n".encode(), b'{"name": ')
        assert answer.split(b" ", 2)[1] == status, answer[:300]
        assert time.monotonic() - started < 3  # answered without waiting for 200 MB
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"]
    # With an admin key, a body past the limit is refused at once too.
    answer = _raw_exchange(gateway.port, b"POST /api/v1/organizations HTTP/1.1\r\nHost: x\r\n" +
                           f"Authorization: Bearer {ADMIN_KEY}\r\nContent-Length: {declared}\r\n\r\n".encode(), b"{")
    assert answer.split(b" ", 2)[1] == b"413", answer[:300]


def test_admin_accepts_json_whatever_the_content_type(admin_setup):
    gateway, _, _ = admin_setup
    body = json.dumps({"name": "Curl made", "id": "curl-made"}).encode()
    status, made = http_request(gateway.port, "POST", "/api/v1/organizations", body,
                                {"Authorization": f"Bearer {ADMIN_KEY}",
                                 "Content-Type": "application/x-www-form-urlencoded"})
    assert status == 201 and made["id"] == "curl-made"
    status, made = http_request(gateway.port, "POST", "/api/v1/organizations/curl-made/keys", b'{"name": "laptop"}',
                                {"Authorization": f"Bearer {ADMIN_KEY}", "Content-Type": "text/plain"})
    assert status == 201 and made["name"] == "laptop"


def test_key_names_are_safe_in_a_path_and_revocable(admin_setup):
    gateway, _, _ = admin_setup
    _make_tenant(gateway, "names")
    status, made = _admin(gateway, "POST", "/api/v1/organizations/names/keys", {"name": "ci.bot@build-1"})
    assert status == 201
    status, answer = _admin(gateway, "DELETE", "/api/v1/organizations/names/keys/ci.bot%40build-1")
    assert status == 200 and answer["revoked"] is True
    with pytest.raises(openai.AuthenticationError):
        gateway.client(made["key"]).models.list()


def test_a_nul_in_a_path_is_a_400_on_every_route(admin_setup):
    gateway, _, _ = admin_setup
    _make_tenant(gateway, "nulpath")
    for method, path in (("GET", "/api/v1/organizations/a%00b/history"),
                         ("DELETE", "/api/v1/organizations/nulpath/keys/k%00"),
                         ("GET", "/api/v1/organizations/a%00b"), ("GET", "/api/v1/router/scorers/a%00b")):
        status, answer = _admin(gateway, method, path)
        assert status == 400 and answer["error"]["code"] == "invalid_path", (path, answer)
    status, answer = http_request(gateway.port, "GET", "/api/v1/organizations/a%00b/history")
    assert status == 401  # the door is still checked first
    status, keys = _admin(gateway, "GET", "/api/v1/organizations/nulpath/keys")
    assert status == 200 and [k["name"] for k in keys["data"]] == ["k"]


def test_usage_dates_out_of_range_are_a_400(admin_setup):
    gateway, tenant_key, _ = admin_setup
    auth = {"Authorization": f"Bearer {tenant_key}"}
    for query, param in (("start=0001-01-01&end=9999-12-31", "start"), ("start=2026-01-01&end=10000-01-01", "end"),
                         ("start=2026-02-30", "start"), ("start=0", "start"), ("end=20260101", "end")):
        status, answer = http_request(gateway.port, "GET", f"/v1/usage?{query}", headers=auth)
        assert status == 400, (query, answer)
        assert answer["error"]["param"] == param, (query, answer)
    status, answer = _admin(gateway, "GET", "/api/v1/organizations/yaml-tenant/usage?start=0001-01-01")
    assert status == 400 and answer["error"]["param"] == "start"


def test_a_deleted_tenants_id_used_again_starts_clean(admin_setup, stores):
    gateway, _, _ = admin_setup
    key = _make_tenant(gateway, "reborn", limits={"requests_per_minute": 3})
    client = gateway.client(key)
    question = dict(model="small", messages=[{"role": "user", "content": "remember me"}], temperature=0)
    first = client.chat.completions.with_raw_response.create(**question)
    assert first.headers["x-gateway-cache"] == "miss"
    kept = client.responses.create(model="small", input="remember this conversation")
    deadline = time.monotonic() + 5
    while client.chat.completions.with_raw_response.create(**question).headers["x-gateway-cache"] != "hit":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert _admin(gateway, "DELETE", "/api/v1/organizations/reborn")[0] == 200
    new_key = _make_tenant(gateway, "reborn", limits={"requests_per_minute": 3})
    fresh = gateway.client(new_key)
    answered = fresh.chat.completions.with_raw_response.create(**question)
    assert answered.headers["x-gateway-cache"] == "miss"  # the old tenant's answer is not the new one's
    assert answered.headers["x-ratelimit-remaining-requests"] == "2"  # nor are its counters
    with pytest.raises(openai.NotFoundError):  # nor its stored responses
        fresh.responses.retrieve(kept.id)
    assert not stores.query_in(gateway.database_url, "SELECT 1 FROM stored_responses WHERE id = $1", kept.id)
    time.sleep(0.5)
    status, usage = http_request(gateway.port, "GET", "/v1/usage", headers={"Authorization": f"Bearer {new_key}"})
    assert status == 200 and usage["requests"] == 1
    status, history = _admin(gateway, "GET", "/api/v1/organizations/reborn/history")
    assert status == 200 and len(history["data"]) == 1
    assert history["data"][0]["usage"]["requests"] >= 2  # the old tenant's rows stay, marked as its own


def test_a_used_id_is_not_given_again_while_the_old_tenants_state_cannot_be_cleared(admin_setup, stores):
    """Redis away at the delete and at the next create under the same id: the old tenant's counters and cached
    answers would be the new one's once Redis is back, so the id waits until they can be cleared."""
    gateway, _, _ = admin_setup
    key = _make_tenant(gateway, "phoenix")
    question = dict(model="small", messages=[{"role": "user", "content": "rise again"}], temperature=0)
    assert gateway.client(key).chat.completions.create(**question).choices
    stores.stop_redis()
    try:
        assert _admin(gateway, "DELETE", "/api/v1/organizations/phoenix")[0] == 200
        status, refused = _admin(gateway, "POST", "/api/v1/organizations", {"name": "phoenix", "id": "phoenix"})
        assert status == 503, refused
        assert refused["error"]["code"] == "store_unavailable" and refused["error"]["param"] == "id"
        assert "counters and cached answers" in refused["error"]["message"]
        status, _ = _admin(gateway, "POST", "/api/v1/organizations", {"name": "never used", "id": "fresh-id"})
        assert status == 201  # an id nobody had needs nothing cleared
    finally:
        stores.start_redis()
    deadline = time.monotonic() + 10
    while (status := _admin(gateway, "POST", "/api/v1/organizations", {"name": "phoenix", "id": "phoenix"})[0]) == 503:
        assert time.monotonic() < deadline, "the id stayed refused after Redis came back"
        time.sleep(0.2)
    assert status == 201


def test_tenants_of_the_api_keep_working_while_postgres_is_down_at_start(admin_setup, stores):
    gateway, _, config = admin_setup
    key = _make_tenant(gateway, "survivor")
    time.sleep(1.5)  # the local copy of the directory is written within a second of a change
    gateway.stop()
    stores.stop_postgres()
    try:
        alone = GatewayProcess(config, env={"GATEWAY_ADMIN_KEY": ADMIN_KEY, "DATABASE_URL": gateway.database_url})
        try:
            assert alone.client(key).chat.completions.create(model="small", messages=HELLO).choices
            messages = [line.get("message", "") for line in alone.log_lines()]
            assert any("local copy" in m for m in messages)
        finally:
            alone.stop()
    finally:
        stores.start_postgres()


def test_key_made_a_moment_ago_works_at_once(admin_setup, tmp_path):
    gateway, _, config = admin_setup
    # The other replica polls rarely: the key it has not seen yet must still work on the first try.
    slow = GatewayProcess(config, env={"GATEWAY_ADMIN_KEY": ADMIN_KEY, "DATABASE_URL": gateway.database_url,
                                       "GATEWAY_RELOAD_INTERVAL": "60"})
    try:
        key = _make_tenant(gateway, "instant")
        assert slow.client(key).chat.completions.create(model="small", messages=HELLO).choices
        file_key = generate_key()
        tenants = yaml.safe_load((config / "tenants.yaml").read_text())
        tenants["tenants"]["yaml-tenant"]["keys"].append({"name": "fresh", "sha256": hash_key(file_key)})
        (config / "tenants.yaml").write_text(yaml.safe_dump(tenants))
        time.sleep(1.1)  # at most one look a second
        assert slow.client(file_key).models.list().data
    finally:
        slow.stop()

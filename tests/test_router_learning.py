"""The router on live traffic: thresholds kept at a target share of large-model calls (shared by replicas), the
tenants' feedback, what the ledger keeps to learn from, and a scorer trained on the gateway's own traffic through
the admin API, then switched on in models.yaml."""

from __future__ import annotations

import gzip
import json
import random
import time

import pytest
import yaml

from conftest import GatewayProcess, http_request, ledger_row, simulators
from gateway.config.keys import generate_key, hash_key
from gateway.routing.commands import PACKAGED_DATA

ADMIN_KEY = "sk-admin-router-learning-0000000000"
TENANTS = ("alpha", "beta", "gamma", "quiet", "delta", "epsilon")


@pytest.fixture(scope="module")
def sims():
    with simulators("small", "large") as started:
        yield started


@pytest.fixture(scope="module")
def keys() -> dict[str, str]:
    return {tenant: generate_key() for tenant in TENANTS}


def _config(folder, sims, keys, keep_examples: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    models = {
        "models": {
            "mini": {"size": "small", "pricing": {"input_per_million": 0.15, "output_per_million": 0.6},
                     "deployments": [{"name": "mini-sim", "api_base": f"{sims['small'].url}/v1", "model": "mini"}]},
            "big": {"size": "large", "pricing": {"input_per_million": 2.5, "output_per_million": 10},
                    "deployments": [{"name": "big-sim", "api_base": f"{sims['large'].url}/v1", "model": "big"}]},
        },
        "router": {
            "profiles": {
                "default": {"simple": "mini", "moderate": "mini", "complex": "big", "critical": "big",
                            "target_large_share": 0.4},
                "plain": {"simple": "mini", "moderate": "mini", "complex": "big", "critical": "big"},
                "quality": {"simple": "mini", "moderate": "big", "complex": "big", "critical": "big"},
            },
            "learning": {"keep_examples": keep_examples},
        },
    }
    tenants = {"admin_keys": [{"name": "ops", "sha256": hash_key(ADMIN_KEY)}], "tenants": {
        "alpha": {"name": "Alpha", "tier": "enterprise", "keys": [{"name": "k", "sha256": hash_key(keys["alpha"])}]},
        "beta": {"name": "Beta", "tier": "enterprise", "keys": [{"name": "k", "sha256": hash_key(keys["beta"])}]},
        "gamma": {"name": "Gamma", "tier": "enterprise", "routing": {"profile": "quality", "target_large_share": 0.5},
                  "keys": [{"name": "k", "sha256": hash_key(keys["gamma"])}]},
        "quiet": {"name": "Quiet", "tier": "enterprise", "routing": {"profile": "plain"},
                  "keys": [{"name": "k", "sha256": hash_key(keys["quiet"])}]},
        **{tenant: {"name": tenant.title(), "tier": "enterprise", "routing": {"profile": "plain"},
                    "keys": [{"name": "k", "sha256": hash_key(keys[tenant])}]} for tenant in ("delta", "epsilon")},
    }}
    (folder / "models.yaml").write_text(yaml.safe_dump(models, sort_keys=False))
    (folder / "tenants.yaml").write_text(yaml.safe_dump(tenants, sort_keys=False))


@pytest.fixture(scope="module")
def gateway(sims, keys, tmp_path_factory):
    folder = tmp_path_factory.mktemp("learning")
    _config(folder, sims, keys)
    process = GatewayProcess(folder, env={"GATEWAY_SHARE_INTERVAL": "0.3"})
    yield process
    process.stop()


@pytest.fixture(scope="module")
def prompts() -> list[str]:
    """Real variety: questions of the MMLU routing data, in a fixed order."""
    rows = [json.loads(line) for line in gzip.decompress(PACKAGED_DATA.read_bytes()).decode().splitlines()]
    chosen = [row["prompt"] for row in rows]
    random.Random(7).shuffle(chosen)
    return chosen[:1200]


def chat(gateway: GatewayProcess, key: str, content: str) -> tuple[int, dict]:
    return http_request(gateway.port, "POST", "/v1/chat/completions",
                        json.dumps({"model": "auto", "messages": [{"role": "user", "content": content}],
                                    "max_tokens": 4}).encode(),
                        {"Authorization": f"Bearer {key}", "Content-Type": "application/json"})


def routed_to_large(gateway: GatewayProcess, key: str, batch: list[str]) -> float:
    large = 0
    for content in batch:
        status, body = chat(gateway, key, content)
        assert status == 200, body
        large += body["model"] == "big"
    return large / len(batch)


def routing_stats(gateway: GatewayProcess, tenant: str) -> dict:
    status, report = http_request(gateway.port, "GET", f"/api/v1/organizations/{tenant}/routing",
                                  headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert status == 200, report
    return report


def test_thresholds_follow_the_traffic_to_keep_the_target_share(gateway, keys, prompts, tmp_path, sims):
    """Without a target the scorer's own thresholds send a share set on another kind of traffic; with one, the
    share on this traffic comes to the target, for the profile and for a tenant with its own target."""
    before = routed_to_large(gateway, keys["quiet"], prompts[:150])  # the same models, no target
    routed_to_large(gateway, keys["alpha"], prompts[150:330])  # fills the default profile's window
    routed_to_large(gateway, keys["gamma"], prompts[330:510])  # and gamma's own
    time.sleep(1.0)
    alpha = routed_to_large(gateway, keys["alpha"], prompts[510:710])
    gamma = routed_to_large(gateway, keys["gamma"], prompts[710:910])
    assert abs(alpha - 0.4) < 0.1, alpha
    assert abs(gamma - 0.5) < 0.1, gamma
    assert before < 0.3  # the scorer's own thresholds: the share they were set for on other traffic

    report = routing_stats(gateway, "alpha")
    target = report["large_share"]["targets"]["auto"]
    assert target["target_large_share"] == 0.4 and target["scope"] == "profile:default"
    assert target["recent_scores"] >= 100 and target["thresholds_in_force"]["complex"] > 0
    assert abs(report["large_share"]["routed_to_large"] - 0.4) < 0.15  # the whole month, warm-up included
    assert routing_stats(gateway, "gamma")["large_share"]["targets"]["auto"]["scope"] == "tenant:gamma"
    assert routing_stats(gateway, "quiet")["large_share"]["targets"] == {}

    # A second replica sharing Redis keeps the same thresholds without traffic of its own.
    folder = tmp_path / "replica"
    _config(folder, sims, keys)
    replica = GatewayProcess(folder, env={"GATEWAY_SHARE_INTERVAL": "0.3"})
    try:
        chat(replica, keys["alpha"], "hello")  # the replica learns the scope exists
        deadline = time.monotonic() + 10
        while True:
            seen = routing_stats(replica, "alpha")["large_share"]["targets"]["auto"]
            if seen["thresholds_in_force"] is not None or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert seen["recent_scores"] >= 100
        assert abs(routed_to_large(replica, keys["alpha"], prompts[910:1110]) - 0.4) < 0.1
    finally:
        replica.stop()


def test_the_ledger_keeps_hashed_words_and_signals_not_text(gateway, keys, stores):
    content = "Zanzibar quokka marmalade: how many jars remain after each of 3 days if 12 are eaten per day?"
    raw = gateway.client(keys["quiet"]).chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": content}])
    assert raw.parse().model == "mini"
    row = ledger_row(stores, raw.headers["x-request-id"])
    kept = json.loads(row["route_example"])
    assert kept["words"] and all(isinstance(w, int) for w in kept["words"])
    assert kept["signals"]["multi_step"] > 0 and kept["signals"]["quantitative"] > 0
    text = row["route_example"].lower()
    assert "zanzibar" not in text and "quokka" not in text and "marmalade" not in text
    assert row["cascaded"] is False  # the cascade judged the small model's answer sure


def test_feedback_is_kept_for_the_tenants_own_requests_only(gateway, keys, stores):
    def feedback(key: str, payload) -> tuple[int, dict]:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        return http_request(gateway.port, "POST", "/v1/feedback", body,
                            {"Authorization": f"Bearer {key}", "Content-Type": "application/json"})

    client = gateway.client(keys["alpha"])
    raw = client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "What is a mutex?"}])
    request_id = raw.headers["x-request-id"]
    status, kept = feedback(keys["alpha"], {"request_id": request_id, "rating": "bad", "comment": "too vague"})
    assert status == 200, kept
    assert kept["object"] == "feedback" and kept["rating"] == "bad" and kept["used_by_router"] is True
    status, again = feedback(keys["alpha"], {"request_id": request_id, "rating": 1})
    assert status == 200 and again["rating"] == "good" and again["comment"] is None
    rows = stores.query("SELECT rating FROM feedback WHERE tenant_id = 'alpha' AND request_id = $1", request_id)
    assert [r["rating"] for r in rows] == [1]  # the second rating replaced the first

    status, error = feedback(keys["beta"], {"request_id": request_id, "rating": "bad"})  # another tenant's id
    assert status == 404 and error["error"]["code"] == "request_not_found"
    assert stores.query("SELECT count(*) AS n FROM feedback WHERE tenant_id = 'beta'")[0]["n"] == 0
    status, error = feedback(keys["alpha"], {"request_id": "req_nonexistent", "rating": "good"})
    assert status == 404
    for bad in ({"request_id": request_id, "rating": "meh"}, {"request_id": request_id, "rating": True},
                {"request_id": request_id, "rating": 5}, {"rating": "good"},
                {"request_id": request_id, "rating": "good", "comment": "a\x00b"},
                {"request_id": "x" * 5000, "rating": "good"},
                {"request_id": request_id, "rating": "good", "comment": "c" * 3000},
                {"request_id": request_id, "rating": "good", "extra": 1}):
        status, error = feedback(keys["alpha"], bad)
        assert status == 400 and error["error"]["type"] == "invalid_request_error", (bad, error)
        assert error["error"]["param"] in bad or bad == {"rating": "good"}, (bad, error)
    status, error = feedback(keys["alpha"], {"request_id": request_id, "rating": 5})
    assert error["error"]["param"] == "rating" and "'good', 'bad', 1 or -1" in error["error"]["message"], error
    status, error = feedback(keys["alpha"], b"{not json")
    assert status == 400
    status, error = feedback("sk-not-a-key", {"request_id": request_id, "rating": "good"})
    assert status == 401


def test_a_scorer_trained_on_the_traffic_is_switched_on_in_models_yaml(gateway, keys, stores):
    """Answers the cascade judged unsure (here: prompts saying sim:unsure) teach the scorer which requests need
    the large model; leave-one-tenant-out reports it before models.yaml names it. The traffic is two tenants' on a
    profile with fixed thresholds: the default profile's follow its window, which earlier tests filled."""
    admin = {"Authorization": f"Bearer {ADMIN_KEY}", "Content-Type": "application/json"}
    topics = ["databases", "gardening", "tax law", "physics", "cooking", "poetry", "networks", "history"]
    for i in range(90):
        tenant = ("delta", "epsilon")[i % 2]
        unsure = " sim:unsure" if i % 3 == 0 else ""
        chat(gateway, keys[tenant], f"Tell me something about {topics[i % len(topics)]} number {i}{unsure}")
    time.sleep(0.5)  # the ledger's last batch
    status, started = http_request(gateway.port, "POST", "/api/v1/router/scorers",
                                   json.dumps({"name": "traffic", "days": 1}).encode(), admin)
    assert status == 202 and started["status"] == "training", started
    status, error = http_request(gateway.port, "POST", "/api/v1/router/scorers",
                                 json.dumps({"name": "other", "days": 1}).encode(), admin)
    assert status == 409 and error["error"]["code"] == "training_under_way"
    deadline = time.monotonic() + 60
    while (made := http_request(gateway.port, "GET", "/api/v1/router/scorers/traffic", headers=admin)[1])[
            "status"] == "training":
        assert time.monotonic() < deadline
        time.sleep(0.3)
    assert made["status"] == "ready", made
    assert (gateway.config_dir / "scorers" / "traffic.json").is_file()
    folds = made["report"]["leave_group_out"]["this scorer's blend"]["folds"]
    assert "alpha" in folds and len(folds) >= 2  # one tenant held out at a time (other tests' tenants too)
    assert made["report"]["blend"]["learned"] > 0
    assert "scorer: scorers/traffic.json" in made["models_yaml"]
    status, error = http_request(gateway.port, "GET", "/api/v1/router/scorers/..", headers=admin)
    assert status == 404

    status, error = http_request(gateway.port, "POST", "/api/v1/router/scorers",
                                 json.dumps({"name": "traffic", "days": 1}).encode(), admin)
    assert status == 409 and error["error"]["code"] == "scorer_exists"
    for bad in ({"name": "../escape"}, {"name": "ok", "days": 0}, {"name": "ok", "tenant": "NO SUCH"}):
        status, error = http_request(gateway.port, "POST", "/api/v1/router/scorers", json.dumps(bad).encode(), admin)
        assert status == 400, (bad, error)
    status, error = http_request(gateway.port, "POST", "/api/v1/router/scorers",
                                 json.dumps({"name": "few", "days": 1, "tenant": "beta"}).encode(), admin)
    assert status == 409 and error["error"]["code"] == "too_few_examples"
    status, error = http_request(gateway.port, "POST", "/api/v1/router/scorers",  # never judged unsure
                                 json.dumps({"name": "same", "days": 1, "tenant": "quiet"}).encode(), admin)
    assert status == 409 and error["error"]["code"] == "nothing_to_learn"
    status, _ = http_request(gateway.port, "POST", "/api/v1/router/scorers",
                             json.dumps({"name": "x"}).encode(), {"Authorization": f"Bearer {keys['alpha']}"})
    assert status == 403

    def score(content: str) -> float:
        client = gateway.client(keys["beta"])
        raw = client.chat.completions.with_raw_response.create(
            model="auto", messages=[{"role": "user", "content": content}], max_tokens=2)
        return gateway.request_log(raw.headers["x-request-id"])["route_score"]

    plain, flagged = "Tell me something about rivers", "Tell me something about rivers sim:unsure"
    before = score(flagged) - score(plain)
    models_file = gateway.config_dir / "models.yaml"
    models = yaml.safe_load(models_file.read_text())
    models["router"]["classifier"] = {"scorer": "scorers/traffic.json"}
    models_file.write_text(yaml.safe_dump(models, sort_keys=False))
    deadline = time.monotonic() + 10
    while score(flagged) - score(plain) <= before + 0.05:
        assert time.monotonic() < deadline, "the trained scorer was not switched on"
        time.sleep(0.3)


def test_nothing_is_kept_when_learning_is_off(sims, keys, tmp_path, stores):
    _config(tmp_path / "off", sims, keys, keep_examples=False)
    gateway = GatewayProcess(tmp_path / "off")
    try:
        client = gateway.client(keys["beta"])
        raw = client.chat.completions.with_raw_response.create(
            model="auto", messages=[{"role": "user", "content": "Hi there, what is a queue?"}])
        row = ledger_row(stores, raw.headers["x-request-id"])
        assert row["complexity"] is not None and row["route_example"] is None
    finally:
        gateway.stop()

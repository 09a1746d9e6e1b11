"""The inference fleet: simulated vLLM nodes with few adapter slots, tenants with their own LoRA adapters."""

from __future__ import annotations

import concurrent.futures
import json
import os
import stat
import time
from pathlib import Path

import openai
import pytest
import yaml

from conftest import GatewayProcess, Simulator, http_request, ledger_row
from gateway.config.keys import generate_key, hash_key

ADMIN_KEY = "sk-admin-fleet-0123456789"
BASE = "llama-base"


def _chat(client: openai.OpenAI, model: str, text: str = "hello"):
    return client.chat.completions.with_raw_response.create(model=model, messages=[{"role": "user", "content": text}],
                                                            max_tokens=5)


class Fleet:
    def __init__(self, tmp_path: Path, nodes: int = 3, max_loras: int = 2, swap_ms: float = 50,
                 pool: dict | None = None, tenants: dict | None = None, refresh_seconds: float = 0.3) -> None:
        self.sims = [Simulator("--model", BASE, "--max-loras", str(max_loras), "--lora-swap-ms", str(swap_ms))
                     for _ in range(nodes)]
        self.keys = {name: generate_key() for name in ("acme", "beta", "gamma")}
        config = tmp_path / "config"
        config.mkdir(parents=True)
        pool = pool or {"nodes": [{"url": f"{sim.url}/v1", "name": f"node{i}"} for i, sim in enumerate(self.sims)]}
        models = {"fleet": {"refresh_seconds": refresh_seconds, "failures_before_drain": 2, "load_timeout": 10,
                            "pools": {"llamas": {"model": BASE, **pool}}},
                  "models": {"llama": {"deployments": [{"name": "llamas", "api_base": "fleet:llamas"}]}}}
        adapters = tenants or {
            "acme": {"acme-support": {"base": "llama", "path": "/adapters/acme", "default": True},
                     **{f"acme-extra{i}": {"base": "llama", "path": f"/adapters/acme{i}"} for i in range(6)}},
            "beta": {"beta-legal": {"base": "llama", "path": "/adapters/beta", "on_failure": "base"}},
            "gamma": {},
        }
        (config / "models.yaml").write_text(yaml.safe_dump(models))
        (config / "tenants.yaml").write_text(yaml.safe_dump({"tenants": {
            name: {"name": name, "tier": "enterprise", "adapters": adapters.get(name, {}),
                   "keys": [{"name": "k", "sha256": hash_key(key)}]} for name, key in self.keys.items()}}))
        self.gateway = GatewayProcess(config, env={"GATEWAY_ADMIN_KEY": ADMIN_KEY})
        self.wait_until(lambda view: all(n["state"] == "up" for p in view["pools"].values() for n in p["nodes"]))

    def client(self, tenant: str) -> openai.OpenAI:
        return self.gateway.client(self.keys[tenant])

    def view(self) -> dict:
        status, body = http_request(self.gateway.port, "GET", "/api/v1/fleet",
                                    headers={"Authorization": f"Bearer {ADMIN_KEY}"})
        assert status == 200, body
        return body

    def wait_until(self, condition, timeout: float = 15.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            view = self.view()
            if condition(view):
                return view
            assert time.monotonic() < deadline, view
            time.sleep(0.1)

    def loads(self) -> int:
        return sum(sim.stats()["lora_loads"] for sim in self.sims)

    def stop(self) -> None:
        self.gateway.stop()
        for sim in self.sims:
            sim.stop()


@pytest.fixture
def fleet(tmp_path):
    made = Fleet(tmp_path)
    yield made
    made.stop()


def test_a_tenants_request_runs_on_its_adapter(fleet, stores):
    raw = _chat(fleet.client("acme"), "llama")
    assert raw.headers["x-gateway-adapter"] == "acme-support" and raw.headers["x-gateway-node"].startswith("node")
    assert raw.headers["x-gateway-upstream-model"] == "acme/acme-support"
    node = fleet.sims[int(raw.headers["x-gateway-node"][-1])]
    assert node.last_request()["model"] == "acme/acme-support"  # the name no other tenant's adapter can have
    row = ledger_row(stores, raw.headers["x-request-id"])
    assert row["node"] == raw.headers["x-gateway-node"] and row["adapter"] == "acme-support"
    by_name = _chat(fleet.client("acme"), "acme-extra0")
    assert by_name.headers["x-gateway-adapter"] == "acme-extra0"
    plain = _chat(fleet.client("gamma"), "llama")  # no adapter: the base model
    assert plain.headers["x-gateway-adapter"] == "none" and plain.headers["x-gateway-upstream-model"] == BASE
    listed = {m.id: m for m in fleet.client("acme").models.list().data}
    assert "acme-support" in listed and "beta-legal" not in listed


def test_tenants_never_reach_each_others_adapters(fleet):
    with pytest.raises(openai.NotFoundError):
        _chat(fleet.client("beta"), "acme-support")
    with pytest.raises(openai.NotFoundError):
        _chat(fleet.client("gamma"), "acme/acme-support")  # the node's name for it is not a model of the gateway
    raw = _chat(fleet.client("beta"), "llama")  # beta's adapter is not its default: the base model
    assert raw.headers["x-gateway-adapter"] == "none"


def test_placement_prefers_the_node_where_the_adapter_is(fleet):
    nodes = {_chat(fleet.client("acme"), "llama", f"question {i}").headers["x-gateway-node"] for i in range(12)}
    assert len(nodes) == 1 and fleet.loads() == 1


def test_slots_hold_under_concurrent_traffic_and_the_view_matches_the_nodes(tmp_path):
    """Instant nodes (no swap time, refreshed every 0.3 s) and many adapters asked for at once: no node ever
    registers more adapters than its slots, and the gateway's view of each node is what the node holds."""
    adapters = {"acme": {f"t{i}": {"base": "llama", "path": f"/adapters/t{i}"} for i in range(12)}}
    fleet = Fleet(tmp_path, nodes=2, max_loras=3, swap_ms=0, tenants=adapters)
    try:
        client = fleet.client("acme")
        weights = [1.0 / (rank + 1) ** 1.1 for rank in range(12)]  # Zipf(1.1), as tenants' traffic is
        import random

        chooser = random.Random(7)
        names = chooser.choices([f"t{i}" for i in range(12)], weights, k=500)
        seen = []
        stop = False

        def watch() -> None:
            while not stop:
                seen.extend(len(sim.stats()["lora_registered"]) for sim in fleet.sims)
                time.sleep(0.01)

        with concurrent.futures.ThreadPoolExecutor(25) as pool:
            watcher = pool.submit(watch)
            try:
                answers = list(pool.map(lambda n: _chat(client, n[1], f"q{n[0]}").headers["x-gateway-adapter"],
                                        enumerate(names)))
            finally:  # a request that fails must not leave the watcher running, and the pool waiting, for ever
                stop = True
            watcher.result()
        assert answers == names
        assert seen and max(seen) <= 3, max(seen)
        time.sleep(1.0)  # a refresh or two
        view = {n["name"]: set(n["adapters"]) for n in fleet.view()["pools"]["llamas"]["nodes"]}
        for i, sim in enumerate(fleet.sims):
            assert view[f"node{i}"] == set(sim.stats()["lora_registered"])
        swaps = sum(sim.stats()["lora_swaps"] for sim in fleet.sims)
        assert swaps == fleet.loads()  # every adapter a request ran with was where the gateway thought it was
    finally:
        fleet.stop()


def test_an_adapter_a_node_lost_behind_the_gateways_back_is_loaded_again(tmp_path):
    """A node restarted, or its adapter unloaded by another hand, between two of the gateway's looks at it: the node
    answers 404 for the adapter's name; the client gets its answer from the adapter loaded again, not the 404."""
    fleet = Fleet(tmp_path, nodes=1, refresh_seconds=3600)  # no look at the node while the test runs
    try:
        client = fleet.client("acme")
        assert _chat(client, "llama").headers["x-gateway-adapter"] == "acme-support"
        sim = fleet.sims[0]
        unload = json.dumps({"lora_name": "acme/acme-support"}).encode()
        status, body = http_request(sim.port, "POST", "/v1/unload_lora_adapter", unload)
        assert status == 200, body
        raw = _chat(client, "llama")
        assert raw.status_code == 200 and raw.headers["x-gateway-adapter"] == "acme-support"
        assert sim.last_request()["model"] == "acme/acme-support"
        assert sim.stats()["lora_loads"] == 2
        view = fleet.view()["pools"]["llamas"]["nodes"][0]
        assert view["adapters"] == ["acme/acme-support"] and view["inflight"] == 0
        assert http_request(sim.port, "POST", "/v1/unload_lora_adapter", unload)[0] == 200
        again = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="llama", messages=[{"role": "user", "content": "hi"}], max_tokens=5, stream=True) if c.choices)
        assert again and sim.stats()["lora_loads"] == 3
    finally:
        fleet.stop()


def test_concurrent_requests_for_a_new_adapter_load_it_once(fleet):
    for sim in fleet.sims:
        sim.control(lora_swap_ms=800.0)
    client = fleet.client("acme")
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda i: _chat(client, "acme-extra1", f"q{i}"), range(16)))
    assert {a.headers["x-gateway-adapter"] for a in answers} == {"acme-extra1"}
    assert fleet.loads() == 1  # single flight: one load, fifteen requests waited for it
    assert len({a.headers["x-gateway-node"] for a in answers}) == 1


def test_no_node_holds_more_adapters_than_its_slots(fleet):
    client = fleet.client("acme")
    for round_ in range(2):
        for name in ("acme-support", *(f"acme-extra{i}" for i in range(6))):
            assert _chat(client, name, f"{name} {round_}").headers["x-gateway-adapter"] == name
            for sim in fleet.sims:
                assert len(sim.stats()["lora_registered"]) <= 2
    view = fleet.view()
    assert all(len(n["adapters"]) <= n["slots"] == 2 for n in view["pools"]["llamas"]["nodes"])
    _, metrics = http_request(fleet.gateway.port, "GET", "/metrics")
    assert b"gateway_fleet_adapter_evictions_total" in metrics and b"gateway_fleet_adapter_loads_total" in metrics


def test_a_node_that_dies_mid_load_costs_the_client_nothing(fleet):
    client = fleet.client("acme")
    for sim in fleet.sims:
        sim.control(lora_swap_ms=1500.0)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(_chat, client, "acme-extra2", "survive this")
        deadline = time.monotonic() + 5
        while not any(sim.stats()["lora_loads"] for sim in fleet.sims):  # the load under way on one node
            assert time.monotonic() < deadline
            time.sleep(0.05)
        dead = next(i for i, sim in enumerate(fleet.sims) if sim.stats()["lora_loads"])
        port = fleet.sims[dead].port
        fleet.sims[dead].stop(9)
        answer = pending.result(timeout=30)
    assert answer.headers["x-gateway-adapter"] == "acme-extra2"
    assert answer.headers["x-gateway-node"] != f"node{dead}"
    fleet.wait_until(lambda v: any(n["name"] == f"node{dead}" and n["state"] != "up"
                                   for n in v["pools"]["llamas"]["nodes"]))
    # It comes back on the same address: probed, and up again.
    fleet.sims[dead] = _Restarted(port)
    fleet.wait_until(lambda v: any(n["name"] == f"node{dead}" and n["state"] == "up"
                                   for n in v["pools"]["llamas"]["nodes"]))


class _Restarted(Simulator):
    def __init__(self, port: int) -> None:  # the same node again, on its old port
        from conftest import Process

        Process.__init__(self, ["sim", "--port", str(port), "--model", BASE, "--max-loras", "2"], port, "/health")


def test_an_adapter_no_node_can_load(fleet):
    for sim in fleet.sims:
        sim.control(lora_load_error_status=400)
    with pytest.raises(openai.InternalServerError) as caught:
        _chat(fleet.client("acme"), "acme-extra3")
    assert caught.value.status_code == 503 and caught.value.code == "adapter_unavailable"
    assert "acme-extra3" in caught.value.message
    assert "/adapters" not in caught.value.message and "(400)" in caught.value.message  # which, not where it lives
    raw = _chat(fleet.client("beta"), "beta-legal")  # beta's choice: the base model when its adapter cannot load
    assert raw.headers["x-gateway-adapter"] == "none; beta-legal unavailable"
    assert raw.headers["x-gateway-upstream-model"] == BASE


def test_an_admin_drains_and_pins(fleet):
    auth = {"Authorization": f"Bearer {ADMIN_KEY}"}
    status, node = http_request(fleet.gateway.port, "POST", "/api/v1/fleet/nodes/node0/drain", headers=auth)
    assert status == 200 and node["drained_by_admin"] is True
    nodes = {_chat(fleet.client("gamma"), "llama", f"q{i}").headers["x-gateway-node"] for i in range(9)}
    assert "node0" not in nodes
    http_request(fleet.gateway.port, "POST", "/api/v1/fleet/nodes/node0/undrain", headers=auth)
    status, node = http_request(fleet.gateway.port, "POST", "/api/v1/fleet/nodes/node2/pins",
                                json.dumps({"tenant": "acme", "adapter": "acme-extra4"}).encode(),
                                {**auth, "Content-Type": "application/json"})
    assert status == 200 and "acme/acme-extra4" in node["pinned"] and "acme/acme-extra4" in node["adapters"]
    assert "acme/acme-extra4" in fleet.sims[2].stats()["lora_registered"]
    for path, body, code in (("/api/v1/fleet/nodes/nowhere/drain", None, "node_not_found"),
                             ("/api/v1/fleet/nodes/node1/pins", {"tenant": "beta", "adapter": "acme-support"},
                              "adapter_not_found")):
        status, answer = http_request(fleet.gateway.port, "POST", path,
                                      json.dumps(body).encode() if body else None,
                                      {**auth, "Content-Type": "application/json"})
        assert status == 404 and answer["error"]["code"] == code
    # the admin's hands are in the audit log, with the node's state before and after
    status, log = http_request(fleet.gateway.port, "GET", "/api/v1/audit?limit=500", headers=auth)
    assert status == 200, log
    ours = [e for e in log["data"] if e["action"].startswith("fleet.") and e["target"] in ("node0", "node2")]
    drain = next(e for e in ours if e["action"] == "fleet.drain" and e["target"] == "node0")
    assert drain["before"]["drained_by_admin"] is False and drain["after"]["drained_by_admin"] is True
    pin = next(e for e in ours if e["action"] == "fleet.pin" and e["target"] == "node2")
    assert pin["tenant"] == "acme" and "acme/acme-extra4" in pin["after"]["pinned"]


def test_nodes_found_on_the_mesh_come_and_go(tmp_path, monkeypatch):
    """A stand-in `tailscale` prints recorded `status --json` output; the pool follows what it says."""
    sim = Simulator("--model", BASE)
    status_file = tmp_path / "status.json"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tailscale = bin_dir / "tailscale"
    tailscale.write_text(f"#!/bin/sh\n[ \"$1\" = status ] && [ \"$2\" = --json ] && exec cat {status_file}\nexit 1\n")
    tailscale.chmod(tailscale.stat().st_mode | stat.S_IEXEC)

    def mesh(*peers: tuple[str, str, bool, list[str]]) -> None:
        status_file.write_text(json.dumps({
            "Self": {"HostName": "gateway", "DNSName": "gateway.tail1234.ts.net.", "TailscaleIPs": ["100.64.0.1"]},
            "Peer": {f"nodekey:{name}": {"HostName": name, "DNSName": dns, "TailscaleIPs": ["127.0.0.1"],
                                         "Online": online, "Tags": tags} for name, dns, online, tags in peers}}))

    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    # Every peer resolves to this machine (the MagicDNS name "localhost." or the address 127.0.0.1).
    mesh(("gpu-a", "localhost.", True, ["tag:vllm"]), ("gpu-b", "", True, ["tag:other"]),
         ("gpu-c", "", False, ["tag:vllm"]))
    fleet = Fleet(tmp_path / "f", nodes=0, pool={"discovery": {"tailscale": {"tag": "tag:vllm", "port": sim.port}}})
    try:
        names = lambda v: sorted(n["name"] for n in v["pools"]["llamas"]["nodes"])  # noqa: E731
        view = fleet.wait_until(lambda v: names(v) == [f"gpu-a:{sim.port}"])
        node = view["pools"]["llamas"]["nodes"][0]
        assert node["source"] == "tailscale" and node["url"] == f"http://localhost:{sim.port}/v1"
        assert _chat(fleet.client("gamma"), "llama").headers["x-gateway-node"] == f"gpu-a:{sim.port}"
        mesh(("gpu-a", "localhost.", False, ["tag:vllm"]), ("gpu-d", "", True, ["tag:vllm", "tag:gpu"]))
        view = fleet.wait_until(lambda v: names(v) == [f"gpu-d:{sim.port}"])
        assert view["pools"]["llamas"]["nodes"][0]["url"] == f"http://127.0.0.1:{sim.port}/v1"
        fleet.wait_until(lambda v: v["pools"]["llamas"]["nodes"][0]["state"] == "up")
        assert _chat(fleet.client("gamma"), "llama").headers["x-gateway-node"] == f"gpu-d:{sim.port}"
    finally:
        fleet.stop()
        sim.stop()

"""A gateway with two tenants from tenants.yaml and traffic in its ledger, for the console and its reports."""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from pathlib import Path
from typing import Iterator

import yaml

import pytest
from playwright import sync_api as playwright_api

from conftest import GatewayProcess, Simulator, http_request
from gateway.config.keys import generate_key, hash_key

ADMIN_KEY = "sk-admin-console-" + "c" * 24
HOSTILE_NAME = "Globex <img src=x onerror=\"window.pwned=1\">"


def write_config(folder: Path, sim: Simulator, keys: dict[str, str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    models = {
        "defaults": {"reference_model": "large"},
        "models": {
            "small": {"size": "small", "pricing": {"input_per_million": 0.15, "output_per_million": 0.6},
                      "deployments": [{"name": "small-sim", "api_base": f"{sim.url}/v1", "model": "sim-small"}]},
            "large": {"size": "large", "pricing": {"input_per_million": 2.5, "output_per_million": 10},
                      "deployments": [{"name": "large-sim", "api_base": f"{sim.url}/v1", "model": "sim-large"}]},
        },
        "router": {"profiles": {"default": {"simple": "small", "moderate": "small", "complex": "large",
                                            "critical": "large"}}},
    }
    tenants = {"tenants": {
        "acme": {"name": "Acme Corp", "tier": "enterprise", "limits": {"monthly_budget_usd": 50},
                 "keys": [{"name": "acme-backend", "sha256": hash_key(keys["acme"])}]},
        "globex": {"name": HOSTILE_NAME, "tier": "professional", "limits": {"requests_per_minute": 5},
                   "keys": [{"name": "globex-app", "sha256": hash_key(keys["globex"])}]},
    }}
    (folder / "models.yaml").write_text(yaml.safe_dump(models, sort_keys=False))
    (folder / "tenants.yaml").write_text(yaml.safe_dump(tenants, sort_keys=False))


def start(folder: Path, sim: Simulator) -> tuple[GatewayProcess, dict[str, str]]:
    keys = {"acme": generate_key(), "globex": generate_key()}
    write_config(folder, sim, keys)
    gateway = GatewayProcess(folder, env={"GATEWAY_ADMIN_KEY": ADMIN_KEY})
    return gateway, keys


def traffic(gateway: GatewayProcess, keys: dict[str, str]) -> dict[str, int]:
    """Requests of both tenants: routed ones, named models, and globex past its 5 requests a minute."""
    statuses = {"acme": 0, "globex": 0}
    prompts = ["Hi there", "Analyze the root cause of the outage, then compare each trade-off step by step",
               "Translate good morning to French", "We had a security breach: draft the HIPAA incident response"]
    for tenant, count in (("acme", 8), ("globex", 7)):
        for i in range(count):
            body = {"model": ("auto", "small", "auto", "large")[i % 4], "max_tokens": 8,
                    "messages": [{"role": "user", "content": prompts[i % len(prompts)]}]}
            status, _ = http_request(gateway.port, "POST", "/v1/chat/completions", json.dumps(body).encode(),
                                     {"Authorization": f"Bearer {keys[tenant]}", "Content-Type": "application/json"})
            statuses[tenant] += 1
    return statuses


def admin(gateway: GatewayProcess, method: str, path: str, body: object = None, key: str = ADMIN_KEY):
    payload = json.dumps(body).encode() if body is not None else None
    return http_request(gateway.port, method, path, payload,
                        {"Authorization": f"Bearer {key}", "Content-Type": "application/json"})


@contextlib.contextmanager
def with_traffic(folder: Path, sim: Simulator) -> Iterator[tuple[GatewayProcess, dict[str, str]]]:
    """A started gateway with both tenants' traffic in its ledger; stopped afterwards."""
    gateway, keys = start(folder, sim)
    try:
        traffic(gateway, keys)
        time.sleep(0.5)  # the ledger's last batch
        yield gateway, keys
    finally:
        gateway.stop()


# The browser the console's tests drive (fixtures imported by the test modules that use them)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
@pytest.fixture(scope="module")
def browser():
    assert CHROMIUM, "Chromium is missing: tests/run.sh installs Debian's chromium package"
    with playwright_api.sync_playwright() as driver:
        launched = driver.chromium.launch(executable_path=CHROMIUM, headless=True,
                                          args=["--no-sandbox", "--disable-gpu"])
        yield launched
        launched.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1320, "height": 900})
    opened = context.new_page()
    errors: list[str] = []
    opened.on("pageerror", lambda error: errors.append(str(error)))
    opened.on("console", lambda message: errors.append(message.text) if message.type == "error"
              and "status of 40" not in message.text else None)  # 401/403 answers are expected, and shown
    opened.on("request", lambda request: errors.append(f"left the origin: {request.url}")
              if not request.url.startswith(("http://127.0.0.1", "data:")) else None)
    yield opened
    context.close()
    assert not errors, errors


def sign_in(page, gateway, key: str) -> None:
    page.goto(f"{gateway.url}/console/")
    page.fill("#login-key", key)
    page.click("#login-form button")


def go_to(page, name: str, shows: str) -> None:
    """Open a page of the console from its menu and wait for what it shows."""
    page.wait_for_selector(f"[data-page={name}]")
    page.click(f"[data-page={name}]")
    page.wait_for_selector(shows)


def until(condition, timeout: float = 10.0) -> None:
    """Wait for what the page shows (polled from here: the console's policy allows no script from a string)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the page never showed it"
        time.sleep(0.1)

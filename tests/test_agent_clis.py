"""Coding agents run against the gateway as their users run them: Claude Code (``claude -p``, Anthropic's Messages
API, with ``ANTHROPIC_BASE_URL`` and ``ANTHROPIC_AUTH_TOKEN``) and Codex CLI (``codex exec``, the Responses API,
with a provider whose base URL is the gateway). The simulator plays their model: it calls the tool the task names,
then answers in words once the tool's result is back, so that each run goes round the agent's loop once."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from conftest import ROOT

BIN = ROOT / "tests" / "clients" / "node" / "node_modules" / ".bin"


def _requests(stores, tenant: str, route: str, since: float) -> int:
    rows = stores.query("SELECT count(*) AS n FROM usage_ledger WHERE tenant_id = $1 AND route = $2 AND status = 200 "
                        "AND created_at >= to_timestamp($3)", tenant, route, since)
    return rows[0]["n"]


def _wait_for_rows(stores, tenant: str, route: str, since: float, at_least: int) -> int:
    deadline = time.monotonic() + 5
    while (count := _requests(stores, tenant, route, since)) < at_least and time.monotonic() < deadline:
        time.sleep(0.1)
    return count


def test_claude_code_goes_round_its_loop_through_the_gateway(gateway, keys, stores, tmp_path):
    claude = BIN / "claude"
    if not claude.exists():
        pytest.fail("Claude Code is not installed: tests/run.sh installs it with `npm ci` in tests/clients/node")
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.md").write_text("# notes\n")
    started = time.time()
    env = {**os.environ, "HOME": str(tmp_path), "ANTHROPIC_BASE_URL": gateway.url, "ANTHROPIC_AUTH_TOKEN": keys.acme,
           "DISABLE_TELEMETRY": "1", "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", "DISABLE_AUTOUPDATER": "1"}
    env.pop("ANTHROPIC_API_KEY", None)
    done = subprocess.run([str(claude), "-p", "Call the Glob tool now.", "--model", "small", "--tools", "Glob",
                           "--output-format", "json"], cwd=work, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads(done.stdout[done.stdout.index("{"):])
    assert result["is_error"] is False and result["subtype"] == "success", result
    assert result["num_turns"] == 2 and result["result"]  # the tool call, then the answer after its result
    assert _wait_for_rows(stores, "acme", "messages", started, 2) >= 2


def test_codex_cli_goes_round_its_loop_through_the_gateway(gateway, keys, stores, tmp_path):
    codex = BIN / "codex"
    if not codex.exists():
        pytest.fail("Codex CLI is not installed: tests/run.sh installs it with `npm ci` in tests/clients/node")
    home, work = tmp_path / "codex-home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    # Codex always offers its built-in web search, which only OpenAI runs: off, for a model that is translated
    (home / "config.toml").write_text(
        'model = "small"\nmodel_provider = "gateway"\nweb_search = "disabled"\n\n[model_providers.gateway]\n'
        f'name = "Gateway"\nbase_url = "{gateway.url}/v1"\nenv_key = "GATEWAY_KEY"\nwire_api = "responses"\n')
    started = time.time()
    env = {**os.environ, "HOME": str(tmp_path), "CODEX_HOME": str(home), "GATEWAY_KEY": keys.acme}
    env.pop("OPENAI_API_KEY", None)
    done = subprocess.run([str(codex), "exec", "--skip-git-repo-check", "--json", "Use exec_command to list the files"],
                          cwd=work, env=env, capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    events = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    kinds = [event["type"] for event in events]
    assert "turn.completed" in kinds and "turn.failed" not in kinds, kinds
    answers = [e["item"] for e in events if e["type"] == "item.completed" and e["item"]["type"] == "agent_message"]
    assert answers and answers[-1]["text"]
    assert _wait_for_rows(stores, "acme", "responses", started, 2) >= 2  # the tool call, then the answer


def test_the_clients_are_the_versions_the_docs_name():
    package = json.loads((ROOT / "tests" / "clients" / "node" / "package.json").read_text())["dependencies"]
    readme = (ROOT / "docs" / "openai-api.md").read_text()
    for name in ("@anthropic-ai/claude-code", "@openai/codex"):
        assert f"{name} {package[name]}" in readme, name
    assert Path(BIN / "claude").exists() and Path(BIN / "codex").exists()

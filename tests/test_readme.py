"""The README's quick start works as written, pasted into a shell: a key made and used at once, from curl and from
the openai SDK."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from conftest import ROOT, GatewayProcess, copy_shipped_config


def _blocks(language: str) -> list[str]:
    readme = (ROOT / "README.md").read_text()
    return re.findall(rf"```{language}\n(.*?)```", readme, re.S)


def test_quick_start_lines_work_pasted_together(tmp_path):
    config = tmp_path / "config"
    copy_shipped_config(config)
    gateway = GatewayProcess(config, env={"GATEWAY_RELOAD_INTERVAL": "60"})  # the key must work before any poll
    try:
        shell = next(block for block in _blocks("sh") if "keys create" in block)
        shell = shell.replace(".venv/bin/gateway", f"{sys.executable} -m gateway").replace("127.0.0.1:4000",
                                                                                            f"127.0.0.1:{gateway.port}")
        python = next(block for block in _blocks("python") if "OpenAI(" in block).replace(
            "127.0.0.1:4000", f"127.0.0.1:{gateway.port}")
        env = {**os.environ, "GATEWAY_CONFIG_DIR": str(config)}
        script = shell + f"\n{sys.executable} - <<'PYTHON'\n{python}PYTHON\n"
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert '"chat.completion"' in done.stdout and "ChatCompletion(" in done.stdout
        again = subprocess.run(["bash", "-c", shell], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert "already has a key named 'my-laptop'" in again.stderr and "--name" in again.stderr
        assert "no key follows" in again.stdout  # the curl after it says why it has no key
    finally:
        gateway.stop()

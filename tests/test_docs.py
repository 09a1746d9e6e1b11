"""The documentation site builds with every link and anchor checked, its reference pages are written from the
code, and its getting-started page runs the same commands as the README's quick start (which test_readme runs)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import ROOT


def _code_blocks(path: Path) -> list[str]:
    return re.findall(r"```(?:sh|python)\n(.*?)```", path.read_text(), re.S)


def test_the_site_builds_strict_with_its_reference_pages(tmp_path):
    mkdocs = Path(sys.executable).with_name("mkdocs")
    done = subprocess.run([str(mkdocs), "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=ROOT,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONDONTWRITEBYTECODE": "1"},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    fields = (tmp_path / "site" / "reference" / "configuration" / "index.html").read_text()
    for field in ("request_timeout", "monthly_budget_usd", "jwt_issuers", "end_users", "guardrails"):
        assert f"<code>{field}</code>" in fields, field
    api = (tmp_path / "site" / "reference" / "api" / "index.html").read_text()
    for route in ("/api/v1/organizations", "/api/v1/audit", "/health/ready"):
        assert route in api, route
    assert "Dependencies point one way" in (tmp_path / "site" / "architecture" / "index.html").read_text()


def test_getting_started_runs_the_readmes_quick_start():
    readme = _code_blocks(ROOT / "README.md")
    started = _code_blocks(ROOT / "docs" / "getting-started.md")
    assert readme and started == readme

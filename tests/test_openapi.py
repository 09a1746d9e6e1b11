"""The OpenAPI document of the admin, usage and operator routes tells the truth: schemathesis, run against it with
every check, finds nothing."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT, http_request
from test_admin import ADMIN_KEY, admin_setup  # noqa: F401  (the fixture)


def test_the_document_says_what_the_routes_answer(admin_setup):
    gateway, _, _ = admin_setup
    status, document = http_request(gateway.port, "GET", "/openapi.json")
    assert status == 200
    text = json.dumps(document)
    assert '"422"' not in text and "HTTPValidationError" not in text
    paths = document["paths"]
    assert set(paths["/api/v1/organizations"]["post"]["responses"]) >= {"201", "400", "401", "403", "409", "413"}
    assert "text/plain" in paths["/metrics"]["get"]["responses"]["200"]["content"]
    assert "404" in paths["/v1/files/{file_id}"]["get"]["responses"]
    assert "404" in paths["/v1/vector_stores/{store_id}/search"]["post"]["responses"]
    upload = paths["/v1/files"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert upload["required"] == ["file", "purpose"]
    tenant = document["components"]["schemas"]["TenantIn"]["properties"]
    assert tenant["tier"]["enum"] == ["basic", "enterprise", "professional"]  # what this config accepts
    assert tenant["limits"]["anyOf"][0]["$ref"] if "anyOf" in tenant["limits"] else tenant["limits"]["$ref"]
    status, answer = http_request(gateway.port, "OPTIONS", "/api/v1/organizations",
                                  headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert status == 405 and answer["error"]["code"] == "method_not_allowed"


def test_schemathesis_finds_nothing(admin_setup, tmp_path):
    gateway, _, _ = admin_setup
    done = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "--config-file", str(ROOT / "tests" / "schemathesis.toml"), "run",
         f"{gateway.url}/openapi.json", "-H", f"Authorization: Bearer {ADMIN_KEY}", "--checks", "all",
         "--max-examples", "25", "--seed", "20261126", "--no-color", "--report", "junit",
         "--report-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-6000:]
    assert "passed" in done.stdout

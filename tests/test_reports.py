"""The reports the console draws, as any client reads them: usage and routing over every tenant, recent requests,
the gateway's status (admin), and a tenant's own account."""

from __future__ import annotations

from urllib.parse import quote

import pytest

from console_setup import admin, with_traffic


@pytest.fixture(scope="module")
def setup(sim, tmp_path_factory):
    with with_traffic(tmp_path_factory.mktemp("reports"), sim) as started:
        yield started


def test_usage_and_routing_over_every_tenant(setup):
    gateway, keys = setup
    status, usage = admin(gateway, "GET", "/api/v1/usage")
    assert status == 200 and usage["tenant"] is None
    tenants = {row["tenant"]: row for row in usage["by_tenant"]}
    assert tenants["acme"]["requests"] >= 8 and tenants["globex"]["requests"] >= 7
    assert tenants["globex"]["limit_refusals"] >= 2  # 7 requests against 5 a minute
    assert usage["limit_refusals"] >= tenants["globex"]["limit_refusals"]
    assert sum(day["requests"] for day in usage["by_day"]) == usage["requests"]
    status, own = admin(gateway, "GET", "/api/v1/organizations/acme/usage")
    assert status == 200 and own["requests"] == tenants["acme"]["requests"] and "by_tenant" not in own
    status, routing = admin(gateway, "GET", "/api/v1/routing")
    assert status == 200 and routing["routed_requests"] >= 6 and sum(routing["by_complexity"].values()) >= 6
    status, error = admin(gateway, "GET", "/api/v1/usage?start=2026-02-30")
    assert status == 400 and error["error"]["param"] == "start"
    status, error = admin(gateway, "GET", "/api/v1/usage?start=2026-05-01&end=2026-04-01")
    assert status == 400 and error["error"]["param"] == "end"


def test_recent_requests_filtered_and_paged(setup):
    gateway, keys = setup
    status, page = admin(gateway, "GET", "/api/v1/requests?tenant=globex&limit=3")
    assert status == 200 and len(page["data"]) == 3 and page["has_more"]
    assert {row["tenant_id"] for row in page["data"]} == {"globex"}
    times = [row["created_at"] for row in page["data"]]
    assert times == sorted(times, reverse=True)
    status, older = admin(gateway, "GET", f"/api/v1/requests?tenant=globex&limit=3&before={quote(times[-1])}")
    assert status == 200 and all(row["created_at"] < times[-1] for row in older["data"])
    status, everything = admin(gateway, "GET", "/api/v1/requests?tenant=globex&limit=500")
    count = len(everything["data"])
    assert status == 200 and everything["has_more"] is False and count > 3
    status, exact = admin(gateway, "GET", f"/api/v1/requests?tenant=globex&limit={count}")
    assert len(exact["data"]) == count and exact["has_more"] is False  # a full last page says there is no more
    status, refused = admin(gateway, "GET", "/api/v1/requests?status=429")
    assert status == 200 and refused["data"] and {row["status"] for row in refused["data"]} == {429}
    status, by_model = admin(gateway, "GET", "/api/v1/requests?model=large")
    assert status == 200 and {row["model"] for row in by_model["data"]} <= {"large"}
    row = page["data"][0]
    assert "messages" not in row and "prompt" not in row  # the ledger keeps no text
    for bad, param in (("status=abc", "status"), ("status=99", "status"), ("limit=100000", "limit"),
                       ("before=yesterday", "before"), ("tenant=Not%20An%20Id", "tenant"),
                       ("model=a%00b", "model"), ("before=9999-12-31T23:00:00-01:00", "before"),
                       ("before=0001-01-01T00:30:00%2B01:00", "before")):
        status, error = admin(gateway, "GET", f"/api/v1/requests?{bad}")
        assert status == 400 and error["error"]["param"] == param, (bad, error)


def test_status_says_what_is_up(setup):
    gateway, _ = setup
    status, report = admin(gateway, "GET", "/api/v1/status")
    assert status == 200 and report["stores"] == {"redis": True, "postgres": True}
    assert {(d["model"], d["deployment"]) for d in report["deployments"]} >= {("small", "small-sim"),
                                                                               ("large", "large-sim")}
    assert all(d["failures_in_a_row"] == 0 for d in report["deployments"])


def test_a_tenant_reads_its_own_account_and_nothing_else(setup):
    gateway, keys = setup
    status, account = admin(gateway, "GET", "/v1/account", key=keys["acme"])
    assert status == 200 and account["id"] == "acme" and account["name"] == "Acme Corp"
    assert account["budget"]["monthly_budget_usd"] == 50
    assert 0 < account["budget"]["spent_usd"] < 1 and account["budget"]["left_usd"] == pytest.approx(
        50 - account["budget"]["spent_usd"], abs=1e-6)
    assert [k["name"] for k in account["keys"]] == ["acme-backend"]
    assert "sha256" not in str(account) and keys["acme"] not in str(account)
    for path in ("/api/v1/usage", "/api/v1/requests", "/api/v1/status", "/api/v1/routing",
                 "/api/v1/organizations/globex/usage"):
        status, error = admin(gateway, "GET", path, key=keys["acme"])
        assert status == 403 and error["error"]["code"] == "admin_key_required", path
    status, error = admin(gateway, "GET", "/v1/account", key="sk-nobody")
    assert status == 401
    status, account = admin(gateway, "GET", "/v1/account", key=keys["globex"])
    assert account["id"] == "globex" and account["budget"]["monthly_budget_usd"] == 600  # the tier's budget
    assert account["limits"]["requests_per_minute"] == 5


def test_limits_are_merged_by_a_patch(setup):
    """A PATCH of one limit keeps the others (JSON merge patch); null sends one back to the tier's."""
    gateway, _ = setup
    status, made = admin(gateway, "POST", "/api/v1/organizations",
                         {"name": "Merged", "id": "merged", "limits": {"requests_per_minute": 7,
                                                                        "monthly_budget_usd": 9}})
    assert status == 201, made
    status, changed = admin(gateway, "PATCH", "/api/v1/organizations/merged", {"limits": {"monthly_budget_usd": 12}})
    assert status == 200 and changed["limits"]["requests_per_minute"] == 7
    assert changed["limits"]["monthly_budget_usd"] == 12
    status, back = admin(gateway, "PATCH", "/api/v1/organizations/merged", {"limits": {"requests_per_minute": None}})
    assert status == 200 and back["limits"]["requests_per_minute"] != 7 and back["limits"]["monthly_budget_usd"] == 12

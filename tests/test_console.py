"""The console in a real browser (Debian's headless Chromium driven by Playwright): sign-in, a tenant made, a key
made and revoked through the page, charts drawn from the ledger's rows, and a tenant key that sees its own
account only. With GATEWAY_CONSOLE_SCREENSHOTS set to a folder, the main screens are saved there (docs/)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import openai
import pytest

from console_setup import (ADMIN_KEY, HOSTILE_NAME, admin, browser, go_to, page, sign_in, until,  # noqa: F401
                           with_traffic)

SCREENSHOTS = os.environ.get("GATEWAY_CONSOLE_SCREENSHOTS")


@pytest.fixture(scope="module")
def setup(sim, tmp_path_factory):
    with with_traffic(tmp_path_factory.mktemp("console"), sim) as started:
        yield started


def shot(page, name: str) -> None:
    if SCREENSHOTS:
        Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SCREENSHOTS) / f"console-{name}.png"), full_page=True)


def test_the_console_is_served_without_a_key_and_keeps_to_its_origin(setup):
    gateway, _ = setup
    import urllib.request
    with urllib.request.urlopen(f"{gateway.url}/console/") as answer:
        policy = answer.headers["content-security-policy"]
        assert answer.status == 200 and b"Sign in" in answer.read()
    assert "script-src 'self'" in policy and "connect-src 'self'" in policy and "frame-ancestors 'none'" in policy
    with urllib.request.urlopen(f"{gateway.url}/console") as answer:  # redirected to the folder
        assert answer.status == 200 and answer.url.endswith("/console/")


def test_a_wrong_key_is_refused_on_the_page(setup, page):
    gateway, _ = setup
    sign_in(page, gateway, "sk-not-a-key")
    page.wait_for_selector("#login-error:has-text('not valid')")
    assert page.evaluate("sessionStorage.length") == 0
    shot(page, "sign-in")


def test_admin_overview_draws_the_ledger(setup, page):
    gateway, _ = setup
    _, usage = admin(gateway, "GET", "/api/v1/usage")
    sign_in(page, gateway, ADMIN_KEY)
    page.wait_for_selector("[data-stat=requests]")
    assert page.inner_text("[data-stat=requests] .value") == f"{usage['requests']:,}"
    drawn = page.eval_on_selector_all("svg[data-chart=requests_by_day] rect.bar",
                                      "bars => bars.map(b => Number(b.dataset.value))")
    assert sum(drawn) == usage["requests"] and drawn
    by_model = page.eval_on_selector_all("svg[data-chart=requests_by_model] rect.bar", "bars => bars.length")
    assert by_model == len(usage["by_model"]) >= 2
    complexity = page.eval_on_selector_all("svg[data-chart=routing_by_complexity] rect.bar",
                                           "bars => bars.map(b => Number(b.dataset.value))")
    _, routing = admin(gateway, "GET", "/api/v1/routing")
    assert sum(complexity) == routing["routed_requests"] > 0
    table = page.inner_text("[data-table=by_tenant]")
    assert "acme" in table and "globex" in table
    assert page.inner_text("[data-stat=limit_refusals] .value") == str(usage["limit_refusals"])
    shot(page, "overview")
    page.select_option("[data-field=tenant]", "acme")  # one tenant's figures
    page.click("form.row button[type=submit]")
    _, acme = admin(gateway, "GET", "/api/v1/organizations/acme/usage")
    until(lambda: page.locator("[data-stat=requests] .value").all_inner_texts() == [f"{acme['requests']:,}"])
    assert page.evaluate("window.pwned") is None  # the tenant's name was shown as text, never run


def test_tenants_made_and_keys_made_and_revoked_through_the_page(setup, page):
    gateway, _ = setup
    sign_in(page, gateway, ADMIN_KEY)
    go_to(page, "tenants", "[data-table=tenants]")
    assert HOSTILE_NAME in page.inner_text("[data-table=tenants]")
    page.fill("[data-field=search]", "acme")
    assert "Globex" not in page.inner_text("[data-table=tenants]")
    page.fill("[data-field=new-name]", "Initech")
    page.fill("[data-field=new-id]", "initech")
    page.fill("[data-field=new-tier]", "professional")
    page.fill("[data-field=new-budget]", "75")
    page.click("[data-form=create-tenant] button")
    page.wait_for_selector("h1:has-text('Initech (initech)')")
    assert page.inner_text("[data-stat=requests] .value") == "0"  # its page shows its usage this month
    status, made = admin(gateway, "GET", "/api/v1/organizations/initech")
    assert status == 200 and made["tier"] == "professional" and made["limits"]["monthly_budget_usd"] == 75

    page.fill("[data-field=monthly_budget_usd]", "120")
    page.fill("[data-field=tier]", "enterprise")
    page.click("[data-form=edit-tenant] button[type=submit]")
    page.wait_for_selector("#toast:has-text('Saved')")
    _, edited = admin(gateway, "GET", "/api/v1/organizations/initech")
    assert edited["tier"] == "enterprise" and edited["limits"]["monthly_budget_usd"] == 120

    page.fill("[data-field=key-name]", "web")
    page.click("[data-form=create-key] button")
    key = page.inner_text("[data-secret=key]", timeout=5000)
    shot(page, "tenant")
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=key, max_retries=0)
    assert [m.id for m in client.models.list().data]
    page.on("dialog", lambda dialog: dialog.accept())
    page.click("[data-revoke=web]")
    page.wait_for_selector("#toast:has-text('revoked')")
    deadline = time.monotonic() + 5
    while True:
        try:
            client.models.list()
        except openai.AuthenticationError:
            break
        assert time.monotonic() < deadline, "the revoked key still works"
        time.sleep(0.1)
    status, keys = admin(gateway, "GET", "/api/v1/organizations/initech/keys")
    assert keys["data"] == []

    page.fill("[data-field=monthly_budget_usd]", "2000000000")  # past what the API takes: said on the page
    page.click("[data-form=edit-tenant] button[type=submit]")
    assert "monthly_budget_usd" in page.inner_text("[data-form=edit-tenant] [role=alert] .error")
    status, page_tenant = admin(gateway, "GET", "/api/v1/organizations/initech")
    assert page_tenant["limits"]["monthly_budget_usd"] == 120


def test_recent_requests_health_and_fleet_pages(setup, page):
    gateway, _ = setup
    sign_in(page, gateway, ADMIN_KEY)
    go_to(page, "requests", "[data-table=requests]")
    page.fill("[data-field=tenant]", "globex")
    page.fill("[data-field=status]", "429")
    page.click("form.row button[type=submit]")
    until(lambda: all("globex" in row and "429" in row
                      for row in page.locator("[data-table=requests] tbody tr").all_inner_texts()))
    assert page.locator("[data-table=requests] tbody tr").count() >= 2
    shot(page, "requests")
    go_to(page, "health", "[data-health=redis]")
    assert page.inner_text("[data-health=redis]") == "redis: ok"
    assert page.inner_text("[data-health=postgres]") == "postgres: ok"
    assert "small-sim" in page.inner_text("[data-table=deployments]")
    shot(page, "health")
    said: list[str] = []
    page.on("console", lambda message: said.append(message.text))
    failed: list[str] = []
    page.on("response", lambda response: failed.append(response.url) if response.status == 404 else None)
    go_to(page, "fleet", "text=has no fleet")
    assert not failed and not any("404" in text for text in said), (failed, said)  # no fleet is no error


def test_the_console_on_a_phone_and_its_charts_axes(setup, browser):
    gateway, _ = setup
    context = browser.new_context(viewport={"width": 390, "height": 844})
    phone = context.new_page()
    asked: list[str] = []
    phone.on("request", lambda request: asked.append(request.url))
    try:
        sign_in(phone, gateway, ADMIN_KEY)
        phone.wait_for_selector("[data-stat=requests]")
        for selector in ("#sign-out", "[data-page=fleet]", "[data-page=health]"):
            box = phone.locator(selector).bounding_box()
            assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 390, (selector, box)
        assert not any(url.endswith("/favicon.ico") for url in asked)
        for chart in ("requests_by_day", "tokens_by_day", "routing_by_complexity", "cost_by_day"):
            ticks = phone.eval_on_selector_all(f"svg[data-chart={chart}] text.tick", "ts => ts.map(t => t.textContent)")
            assert len(ticks) == 5 and len(set(ticks)) == 5, (chart, ticks)  # no "$0.02, $0.02"
            if chart != "cost_by_day":  # counts: no "37.50" requests (a thousand or more may say 1.3k)
                assert all("." not in tick or tick[-1] in "kMG" for tick in ticks), (chart, ticks)
        assert "–" not in phone.inner_text("[data-table=by_tenant] tbody")  # no row for refused keys
    finally:
        context.close()


def test_a_tenant_key_sees_its_own_account_only(setup, page):
    gateway, keys = setup
    sign_in(page, gateway, keys["acme"])
    page.wait_for_selector("[data-stat=budget_left]")
    assert page.inner_text("#view h1") == "Acme Corp"
    assert page.inner_text("#nav").split() == ["Account", "Usage", "Fine-tuning"]
    assert "acme-backend" in page.inner_text("[data-table=keys]")
    left = page.inner_text("[data-stat=budget_left] .value")
    assert left.startswith("$4") or left.startswith("$50")  # of a $50 budget, a few cents spent
    shot(page, "tenant-account")
    go_to(page, "usage", "svg[data-chart=requests_by_day]")
    _, own = admin(gateway, "GET", "/v1/usage", key=keys["acme"])
    drawn = page.eval_on_selector_all("svg[data-chart=requests_by_day] rect.bar",
                                      "bars => bars.map(b => Number(b.dataset.value))")
    assert sum(drawn) == own["requests"]
    text = page.inner_text("#view")
    assert "globex" not in text.lower() and "by_tenant" not in text
    shot(page, "tenant-usage")
    # what the page's own key may do, asked from the page itself: nothing of another tenant
    answers = page.evaluate("""async () => {
        const key = sessionStorage.getItem('gateway.console.key');
        const paths = ['/api/v1/organizations', '/api/v1/organizations/globex/usage', '/api/v1/requests'];
        return Promise.all(paths.map(p => fetch(p, {headers: {Authorization: 'Bearer ' + key}}).then(r => r.status)));
    }""")
    assert answers == [403, 403, 403]
    page.click("#sign-out")
    page.wait_for_selector("#login-form")
    assert page.evaluate("sessionStorage.getItem('gateway.console.key')") is None


def test_a_tenant_admin_manages_its_tenant_from_the_console_and_a_viewer_reads(setup, page):
    gateway, keys = setup
    status, _ = admin(gateway, "POST", "/api/v1/organizations",
                      {"id": "hooli", "name": "Hooli", "tier": "professional"})
    assert status in (201, 409)
    status, boss = admin(gateway, "POST", "/api/v1/organizations/hooli/keys", {"role": "tenant_admin"})
    assert status == 201
    sign_in(page, gateway, boss["key"])
    page.wait_for_selector("[data-stat=budget_left]")
    assert page.inner_text("#nav").split("\n") == ["Account", "Usage", "Settings and keys", "Requests", "Audit log",
                                                     "Fine-tuning"]
    go_to(page, "manage", "[data-form=edit-tenant]")
    assert page.is_disabled("[data-field=tier]") and page.is_disabled("[data-field=models]")
    page.fill("[data-field=requests_per_minute]", "30")
    page.fill("[data-field=end_users]", '{"limits": {"requests_per_minute": 3}}')
    page.fill("[data-field=guardrails]", '[{"name": "no-cards", "check": "payment_card", "action": "redact"}]')
    page.click("[data-form=edit-tenant] button[type=submit]")
    page.wait_for_selector("#toast:has-text('Saved')")
    saved = admin(gateway, "GET", "/api/v1/organizations/hooli")[1]
    assert saved["limits"]["requests_per_minute"] == 30 and saved["end_users"]["limits"]["requests_per_minute"] == 3
    assert saved["guardrails"][0]["name"] == "no-cards"
    page.fill("[data-field=provider]", "openai")
    page.fill("[data-field=provider-key]", "sk-not-kept")
    page.click("[data-form=provider-key] button")
    until(lambda: "Vault" in page.inner_text("[data-form=provider-key] + [role=alert]"))  # no Vault here: said
    page.fill("[data-field=key-name]", "reader")
    page.select_option("[data-field=key-role]", "viewer")
    page.click("[data-form=create-key] button")
    viewer_key = page.inner_text("[data-secret=key]", timeout=5000)
    until(lambda: "viewer" in page.inner_text("[data-table=keys]"))
    go_to(page, "audit", "[data-table=audit]")
    text = page.inner_text("[data-table=audit]")
    assert "key.create" in text and "tenant.update" in text and viewer_key not in text
    assert "acme" not in text.lower()
    shot(page, "tenant-admin-audit")
    page.click("#sign-out")
    page.wait_for_selector("#login-form")
    sign_in(page, gateway, viewer_key)
    page.wait_for_selector("[data-stat=budget_left]")
    assert page.inner_text("#nav").split("\n") == ["Account", "Usage", "Requests"]
    go_to(page, "requests", "[data-table=requests]")

"""The usage ledger: a row for every request, answered or refused, through PostgreSQL outages and shutdowns."""

from __future__ import annotations

import concurrent.futures
import threading
import time

import openai

from conftest import GatewayProcess, http_request
from gateway.config.keys import generate_key
from test_limits import _away_from_minute_edge, _config, _tenant, _unique

HELLO = [{"role": "user", "content": "hi"}]


def _rows(stores, tenant: str) -> list:
    return stores.query("SELECT * FROM usage_ledger WHERE tenant_id = $1 ORDER BY created_at", tenant)


def _wait_rows(stores, tenant: str, count: int, timeout: float = 15.0) -> list:
    deadline = time.monotonic() + timeout
    while True:
        rows = _rows(stores, tenant)
        if len(rows) >= count or time.monotonic() > deadline:
            return rows
        time.sleep(0.2)


def _request_ids(results) -> list[str]:
    return [r for r in results if r]


def _call(client) -> str | None:
    """The request id of one chat call, answered or refused; None if the gateway could not be reached at all."""
    try:
        raw = client.chat.completions.with_raw_response.create(model="small", messages=HELLO, max_tokens=5)
        return raw.headers["x-request-id"]
    except openai.APIStatusError as error:
        return error.response.headers["x-request-id"]
    except openai.APIConnectionError:
        return None


def test_every_request_answered_or_refused_has_a_row(sim, stores, tmp_path):
    key, tenant = generate_key(), _unique("rows")
    gateway = GatewayProcess(_config(tmp_path / "c", sim.url, {tenant: _tenant(key, requests_per_minute=3)}))
    try:
        client = gateway.client(key)
        _away_from_minute_edge()  # the limit of 3 a minute must see all these requests in one minute
        ok = client.chat.completions.with_raw_response.create(model="small", messages=HELLO, max_tokens=4)
        ids = {ok.headers["x-request-id"]}
        for bad in ({"model": "nope", "messages": HELLO}, {"model": "small", "messages": "x"}):
            status, _ = http_request(gateway.port, "POST", "/v1/chat/completions", __import__("json").dumps(
                bad).encode(), {"Authorization": f"Bearer {key}"})
            assert status in (400, 404)
        ids |= {_call(client) for _ in range(4)}  # two more admitted, then refused by the limit
        rows = _wait_rows(stores, tenant, 7)
    finally:
        gateway.stop()
    assert len(rows) == 7
    by_status = sorted(row["status"] for row in rows)
    assert by_status == [200, 200, 200, 400, 404, 429, 429]
    assert ids <= {row["request_id"] for row in rows}
    answered = next(row for row in rows if row["request_id"] == ok.headers["x-request-id"])
    usage = ok.parse().usage
    assert answered["prompt_tokens"] == usage.prompt_tokens and answered["completion_tokens"] == 4
    assert float(answered["cost_usd"]) == (usage.prompt_tokens * 1.0 + 4 * 2.0) / 1e6
    assert answered["model"] == "small" and answered["deployment"] == "sim" and answered["key_name"] == "k"
    refused = [row for row in rows if row["status"] == 429]
    assert all(row["error_type"] == "rate_limit_exceeded" for row in refused)


def test_rows_survive_postgres_going_down_mid_load(sim, stores, tmp_path):
    key, tenant = generate_key(), _unique("pgdown")
    gateway = GatewayProcess(_config(tmp_path / "c", sim.url, {tenant: _tenant(key)}))
    ids: list[str] = []
    done = threading.Event()

    def load():
        client = gateway.client(key)
        while not done.is_set():
            ids.append(_call(client))

    try:
        workers = [threading.Thread(target=load) for _ in range(4)]
        for worker in workers:
            worker.start()
        time.sleep(1.0)
        stores.stop_postgres()
        time.sleep(2.0)  # requests go on; their rows go to the spool
        stores.start_postgres()
        time.sleep(1.0)
        done.set()
        for worker in workers:
            worker.join()
        rows = _wait_rows(stores, tenant, len(ids))
        spooled = [line for line in gateway.log_lines() if "spooled" in line.get("message", "")]
    finally:
        gateway.stop()
    assert None not in ids and len(ids) > 50
    assert spooled, "PostgreSQL was down, yet no row went to the spool"
    assert sorted(row["request_id"] for row in rows) == sorted(ids)


def test_rows_survive_sigterm_mid_load(sim, stores, tmp_path):
    key, tenant = generate_key(), _unique("sigterm")
    gateway = GatewayProcess(_config(tmp_path / "c", sim.url, {tenant: _tenant(key)}))
    sim.control(ttft_ms=150.0)
    client = gateway.client(key)
    try:
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            futures = [pool.submit(_call, client) for _ in range(400)]
            time.sleep(1.0)
            gateway.process.terminate()  # graceful: requests under way finish, their rows are flushed
            ids = [f.result() for f in futures]
        gateway.process.wait(timeout=30)
    finally:
        gateway.stop()
    answered = [i for i in ids if i]
    assert len(answered) >= 16
    rows = _wait_rows(stores, tenant, len(answered), timeout=5)
    assert sorted(row["request_id"] for row in rows) == sorted(answered)
    assert all(row["status"] == 200 for row in rows)

"""Limits that hold over any span of the window, and that a short Redis outage cannot leave stuck."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import signal
import time

import openai
import pytest
import redis
import yaml

from conftest import GatewayProcess, http_request
from gateway.config.keys import generate_key
from gateway.config.types import ApiKey, Limits, Tenant
from gateway.stores.limits import Limiter
from test_limits import _call, _config, _tenant, _unique


def _limiter_run(url: str, scenario):
    async def run():
        limiter = Limiter(url)
        try:
            return await scenario(limiter)
        finally:
            await limiter.close()

    return asyncio.run(run())


def _tenant_object(tenant_id: str, **limits) -> tuple[Tenant, ApiKey]:
    return (Tenant(id=tenant_id, name="T", enabled=True, model_patterns=("*",), allowed_models=frozenset(),
                   limits=Limits(**limits)), ApiKey(tenant_id, "k", None))


@pytest.mark.parametrize("kind", ["requests", "tokens"])
def test_no_span_of_a_minute_admits_more_than_the_limit(stores, kind):
    """30 just before a minute boundary and 30 just after: a fixed window admitted all 60."""
    limits = {"requests_per_minute": 20} if kind == "requests" else {"tokens_per_minute": 2000}
    tenant, key = _tenant_object(_unique("slide"), **limits)
    boundary = (int(time.time() // 60) + 1) * 60

    async def scenario(limiter: Limiter):
        before = [await limiter.admit(limiter.plan(tenant, key, boundary - 0.6, 600), f"a{i}", 100, 0,
                                      boundary - 0.6 + i * 0.01) for i in range(30)]
        after = [await limiter.admit(limiter.plan(tenant, key, boundary + 0.4, 600), f"b{i}", 100, 0,
                                     boundary + 0.4 + i * 0.01) for i in range(30)]
        late = await limiter.admit(limiter.plan(tenant, key, boundary + 65, 600), "late", 100, 0, boundary + 65)
        return before, after, late

    before, after, late = _limiter_run(stores.redis_url, scenario)
    admitted = sum(a.admitted for a in before) + sum(a.admitted for a in after)
    assert admitted == 20  # within 1.4 s: exactly the limit, not twice it
    refused = next(a for a in after if not a.admitted)
    index = refused.checks.index(refused.refused)
    wait = refused.reset_at(index, boundary + 0.4) - (boundary + 0.4)
    assert 59 <= wait <= 63  # the truth: the first of them leaves the window about a minute after it came
    assert late.admitted


def test_a_windows_total_follows_its_buckets_as_they_age_and_as_settles_correct_them(stores):
    """A window keeps its total beside its buckets (fields -1 to -3): the total must stay the buckets' sum as
    buckets leave the window, as settles correct tokens (one for a bucket gone already changes nothing), and for a
    window written without totals."""
    tenant, key = _tenant_object(_unique("total"), requests_per_minute=10, tokens_per_minute=1000)
    start = (int(time.time() // 60) + 1) * 60.0
    tokens_key = f"gw:{{{tenant.id}}}:win:tok:m"
    direct = redis.Redis.from_url(stores.redis_url)

    def window() -> dict[int, int]:
        return {int(k): int(v) for k, v in direct.hgetall(tokens_key).items()}

    async def scenario(limiter: Limiter):
        first = None
        for i in range(10):  # one every 5 s: ten buckets
            now = start + i * 5
            admitted = await limiter.admit(limiter.plan(tenant, key, now, 600), f"r{i}", 100, 0, now)
            assert admitted.admitted
            first = first or admitted
            if i:
                limiter.settle(admitted, f"r{i}", {"tokens": 40, "budget": 0})
        await asyncio.sleep(0.1)  # the settles (sent without waiting)
        refused = await limiter.admit(limiter.plan(tenant, key, start + 50, 600), "over", 1, 0, start + 50)
        assert not refused.admitted and refused.refused.kind == "requests"
        totals = window()
        assert totals[-1] == sum(v for k, v in totals.items() if k >= 0) == 100 + 9 * 40
        later = start + 62  # the first request's bucket has left the window (it is counted a bucket longer)
        admitted = await limiter.admit(limiter.plan(tenant, key, later, 600), "later", 100, 0, later)
        assert admitted.admitted
        limiter.settle(first, "r0", {"tokens": 10, "budget": 0})  # for a bucket gone: nothing to correct
        await asyncio.sleep(0.1)
        totals = window()
        assert totals[-1] == sum(v for k, v in totals.items() if k >= 0) == 9 * 40 + 100
        direct.hdel(tokens_key, "-1", "-2", "-3")  # a window as written before totals were kept
        again = await limiter.admit(limiter.plan(tenant, key, later + 1, 600), "again", 1, 0, later + 1)
        tokens = next(i for i, check in enumerate(again.checks) if check.key == tokens_key)
        assert again.used(tokens) == 9 * 40 + 100  # counted from the buckets
        assert window()[-1] == 9 * 40 + 100  # and the totals written again

    _limiter_run(stores.redis_url, scenario)


def test_retry_after_and_rate_headers_tell_the_truth(sim, tmp_path):
    key, tenant = generate_key(), _unique("truth")
    gateway = GatewayProcess(_config(tmp_path / "c", sim.url, {tenant: _tenant(key, requests_per_minute=3)}))
    try:
        client = gateway.client(key)
        results = [_call(client) for _ in range(4)]
    finally:
        gateway.stop()
    assert [status for status, _ in results] == [200, 200, 200, 429]
    assert [h["x-ratelimit-remaining-requests"] for _, h in results[:3]] == ["2", "1", "0"]
    refused = results[3][1]
    # OpenAI sends the x-ratelimit headers on a 429 too.
    assert refused["x-ratelimit-limit-requests"] == "3" and refused["x-ratelimit-remaining-requests"] == "0"
    assert "x-ratelimit-limit-tokens" in refused and 55 <= int(refused["retry-after"]) <= 63


def test_budget_refusal_shows_enough_digits(sim, tmp_path):
    key, tenant = generate_key(), _unique("cents")
    gateway = GatewayProcess(_config(tmp_path / "c", sim.url, {tenant: _tenant(key, monthly_budget_usd=0.0001)}))
    try:
        with pytest.raises(openai.RateLimitError) as caught:
            gateway.client(key).chat.completions.create(model="small", messages=[{"role": "user", "content": "hi"}],
                                                        max_tokens=200)
        message = caught.value.body["message"]
        assert "of the $0.0001 monthly budget" in message and "$0.00 " not in message, message
    finally:
        gateway.stop()


def _valkey_pid(stores) -> int:
    return stores.valkey._process.pid


def test_a_short_redis_pause_leaves_no_slot_and_no_reservation_behind(sim, stores, tmp_path):
    key, tenant = generate_key(), _unique("pause")
    config = _config(tmp_path / "c", sim.url, {tenant: _tenant(key, concurrent_requests=5)})
    gateway = GatewayProcess(config)
    sim.control(ttft_ms=1500.0)
    direct = redis.Redis.from_url(stores.redis_url)
    try:
        client = gateway.client(key)
        with concurrent.futures.ThreadPoolExecutor(5) as pool:
            running = [pool.submit(_call, client, extra_body={"max_tokens": 50}) for _ in range(5)]
            time.sleep(0.5)  # five requests in flight, their slots and reservations taken
            assert direct.zcard(f"gw:{{{tenant}}}:inflight") == 5
            os.kill(_valkey_pid(stores), signal.SIGSTOP)  # Redis paused while they finish
            try:
                results = [future.result() for future in running]
                time.sleep(1.5)
            finally:
                os.kill(_valkey_pid(stores), signal.SIGCONT)
        assert [status for status, _ in results] == [200] * 5
        sim.control(ttft_ms=0.0)
        deadline = time.monotonic() + 10
        while direct.zcard(f"gw:{{{tenant}}}:inflight"):
            assert time.monotonic() < deadline, "slots still held after Redis came back"
            time.sleep(0.2)
        while b"gateway_redis_up 1.0" not in http_request(gateway.port, "GET", "/metrics")[1]:
            assert time.monotonic() < deadline, "the gateway did not see Redis come back"
            time.sleep(0.2)
        status, _ = _call(client)
        assert status == 200
        # Tokens were reserved at the worst case (max_tokens 50 each) and corrected to what was used.
        time.sleep(0.5)
        window = {int(k): int(v) for k, v in direct.hgetall(f"gw:{{{tenant}}}:win:tok:m").items()}
        counted = sum(v for k, v in window.items() if k >= 0)  # the buckets (-1 to -3: the window's totals)
        used = stores.query("SELECT sum(prompt_tokens + completion_tokens) AS t FROM usage_ledger "
                            "WHERE tenant_id = $1", tenant)[0]["t"]
        assert counted == used and window[-1] == used
    finally:
        sim.control(ttft_ms=0.0)
        gateway.stop()


def test_a_slot_lives_no_longer_than_the_request_timeout(sim, stores, tmp_path):
    key, tenant = generate_key(), _unique("slot")
    config = _config(tmp_path / "c", sim.url, {tenant: _tenant(key)})
    models = yaml.safe_load((config / "models.yaml").read_text())
    models["defaults"] = {"request_timeout": 2}
    (config / "models.yaml").write_text(yaml.safe_dump(models))
    gateway = GatewayProcess(config)
    sim.control(ttft_ms=5000.0)
    direct = redis.Redis.from_url(stores.redis_url)
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            future = pool.submit(_call, gateway.client(key))
            time.sleep(0.5)
            slots = direct.zrange(f"gw:{{{tenant}}}:inflight", 0, -1, withscores=True)  # the worker's lease's too
            assert slots and all(expiry / 1000 - time.time() < 2 + 30 + 1  # the request timeout plus a margin,
                                 for _, expiry in slots)  # not 15 minutes
            status, headers = future.result()
        assert status == 504 and headers["code"] == "request_timeout"
    finally:
        sim.control(ttft_ms=0.0)
        gateway.stop()

"""A tenant far from its limits does not wait for Redis: its request goes upstream while the admission is on its way,
the answer waits for the admission (and carries its headers), and a refusal heard meanwhile stops the call."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from pathlib import Path

import aiohttp
import openai
import redis as redis_client
import yaml

from conftest import GatewayProcess, ledger_row
from test_limits_hardening import _limiter_run, _tenant_object
from gateway.config.keys import generate_key, hash_key
from gateway.stores.limit_scripts import ADMIT, SETTLE
from gateway.stores.resp import Script

HELLO = [{"role": "user", "content": "hi"}]
DELAY = 0.6  # seconds the slow Redis takes to answer


class SlowRedis:
    """A TCP proxy in front of Valkey whose answers arrive ``delay`` seconds late: a Redis far away. ``sent`` has
    every byte its clients sent."""

    def __init__(self, target: str, delay: float = DELAY) -> None:
        host, port = target.removeprefix("redis://").split("/")[0].rsplit(":", 1)
        self.target = (host, int(port))
        self.delay = delay
        self.sent = bytearray()
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "SlowRedis":
        self.thread.start()
        assert self.ready.wait(10)
        return self

    def __exit__(self, *exc) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.url = f"redis://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        self.ready.set()
        self.loop.run_forever()
        server.close()

    async def _serve(self, client_reader, client_writer) -> None:
        server_reader, server_writer = await asyncio.open_connection(*self.target)

        async def forward(reader, writer, delay: float, log: bytearray | None = None) -> None:
            while data := await reader.read(65536):
                if log is not None:
                    log += data
                if delay:
                    self.loop.call_later(delay, writer.write, data)
                else:
                    writer.write(data)
            writer.close()

        await asyncio.gather(forward(client_reader, server_writer, 0, self.sent),
                             forward(server_reader, client_writer, self.delay), return_exceptions=True)


def _config(path: Path, sim_url: str, key: str, **limits) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "models.yaml").write_text(yaml.safe_dump({"models": {"small": {
        "pricing": {"input_per_million": 1.0, "output_per_million": 2.0},
        "deployments": [{"name": "sim", "api_base": f"{sim_url}/v1", "model": "sim"}]}}}))
    (path / "tenants.yaml").write_text(yaml.safe_dump({"tenants": {f"headroom-{time.time_ns() % 10**9}": {
        "name": "T", "tier": "enterprise", "limits": limits, "keys": [{"name": "k", "sha256": hash_key(key)}]}}}))
    return path


def _timed_request(client: openai.OpenAI, sim) -> tuple[float, float, dict]:
    """(seconds until the upstream had the request, seconds until the client had the answer, its headers)."""
    before = sim.stats()["completed"]
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        answer = pool.submit(client.chat.completions.with_raw_response.create, model="small", messages=HELLO,
                             max_tokens=5)
        while sim.stats()["completed"] == before and not answer.done():
            time.sleep(0.005)
        upstream = time.monotonic() - started
        raw = answer.result()
    return upstream, time.monotonic() - started, dict(raw.headers)


def test_a_tenant_far_from_its_limits_goes_upstream_before_redis_answers(sim, stores, tmp_path):
    key = generate_key()
    config = _config(tmp_path / "c", sim.url, key, requests_per_minute=1000, tokens_per_minute=10**7)
    with SlowRedis(stores.redis_url) as slow:
        # no leases (a tenant whose limits are too small for one, or an end user's, is admitted this way)
        waiting = GatewayProcess(config, env={"REDIS_URL": slow.url, "GATEWAY_LIMITS_HEADROOM_SECONDS": "0",
                                              "GATEWAY_LIMITS_LEASE_SECONDS": "0"})
        ahead = GatewayProcess(config, env={"REDIS_URL": slow.url, "GATEWAY_DATA_DIR": str(tmp_path / "d2"),
                                            "GATEWAY_LIMITS_LEASE_SECONDS": "0"})
        try:
            first = _timed_request(ahead.client(key), sim)  # nothing known of the tenant yet: it waits
            second = _timed_request(ahead.client(key), sim)
            third = _timed_request(ahead.client(key), sim)
            held = _timed_request(waiting.client(key), sim)
            started = time.monotonic()
            raw = ahead.client(key).chat.completions.with_raw_response.create(
                model="small", messages=HELLO, max_tokens=5, stream=True)
            streamed_headers = dict(raw.headers)
            events = list(raw.parse())
            streamed = time.monotonic() - started
        finally:
            ahead.stop()
            waiting.stop()
    assert first[0] >= DELAY and first[1] >= DELAY
    for upstream, answered, headers in (second, third):
        assert upstream < DELAY / 2, (upstream, answered)  # the upstream had it long before Redis answered
        assert answered >= DELAY  # the answer waited for the admission
    # every request counted, in order, and the answers carry the admission's headers
    assert [int(r[2]["x-ratelimit-remaining-requests"]) for r in (first, second, third)] == [999, 998, 997]
    assert held[0] >= DELAY and int(held[2]["x-ratelimit-remaining-requests"]) == 996  # the setting at 0: it waits
    # a stream's head waits for the admission too, and carries its headers
    assert streamed >= DELAY and int(streamed_headers["x-ratelimit-remaining-requests"]) == 995
    assert "".join(e.choices[0].delta.content or "" for e in events if e.choices)


def test_a_refusal_heard_while_the_upstream_is_asked_stops_the_call(sim, stores, tmp_path):
    """Gateway A saw the tenant at 1 of 10 requests; gateway B then used the other 9. A's next request goes upstream
    at once (A's view said there was room), the admission refuses it, and the upstream call is stopped: the client
    gets the 429 long before the upstream would have answered, and nothing is counted or billed for it."""
    key = generate_key()
    config = _config(tmp_path / "c", sim.url, key, requests_per_minute=10)
    a = GatewayProcess(config, env={"GATEWAY_LIMITS_HEADROOM_SECONDS": "60"})
    b = GatewayProcess(config, env={"GATEWAY_DATA_DIR": str(tmp_path / "d2")})
    try:
        a.client(key).chat.completions.create(model="small", messages=HELLO, max_tokens=5)
        with concurrent.futures.ThreadPoolExecutor(9) as pool:
            list(pool.map(lambda _: b.client(key).chat.completions.create(model="small", messages=HELLO,
                                                                          max_tokens=5), range(9)))
        sim.control(ttft_ms=5000.0)
        before = sim.stats()
        started = time.monotonic()
        try:
            a.client(key).chat.completions.with_raw_response.create(model="small", messages=HELLO, max_tokens=5)
            raise AssertionError("admitted past the limit")
        except openai.RateLimitError as refused:
            error = refused
        elapsed = time.monotonic() - started
        deadline = time.monotonic() + 5
        while sim.stats()["cancelled"] == before["cancelled"] and time.monotonic() < deadline:
            time.sleep(0.02)
        after = sim.stats()
        request_id = error.response.headers["x-request-id"]
        line = a.request_log(request_id)
        row = ledger_row(stores, request_id)
    finally:
        a.stop()
        b.stop()
    assert error.code == "rate_limit_exceeded" and "requests per minute" in error.message
    assert elapsed < 2.0  # not the upstream's 5 s
    assert after["cancelled"] == before["cancelled"] + 1 and after["completed"] == before["completed"]
    assert line["status"] == 429 and line["error_type"] == "rate_limit_exceeded"
    assert row["status"] == 429 and row["cost_usd"] == 0 and row["prompt_tokens"] == 0


def test_a_settle_rides_on_the_next_admission_and_goes_alone_without_one(stores):
    """A settle goes with the next admission of its tenant and key (one script call does both, the settle first:
    a limit of one request at a time admits the next), and by itself when no admission comes."""
    tenant, key = _tenant_object(f"ride-{time.time_ns() % 10**9}", concurrent_requests=1, tokens_per_minute=10_000)
    admit, settle = Script(ADMIT).sha.encode(), Script(SETTLE).sha.encode()

    async def scenario(limiter):
        now = time.time()
        plan = limiter.plan(tenant, key, now, 600)
        tokens = next(i for i, check in enumerate(plan.checks) if check.name == "tokens per minute")
        first = await limiter.admit(plan, "first", 1000, 0, now)
        limiter.settle(first, "first", {"tokens": 10, "budget": 0})
        second = await limiter.admit(plan, "second", 1000, 0, now)
        assert first.admitted and second.admitted and second.used(tokens) == 10 + 1000
        limiter.settle(second, "second", {"tokens": 20, "budget": 0})
        await asyncio.sleep(0.05)  # no admission comes: the settle goes alone
        third = await limiter.admit(plan, "third", 1000, 0, now)
        assert third.admitted and third.used(tokens) == 10 + 20 + 1000
        limiter.settle(third, "third", {"tokens": 30, "budget": 0})  # the limiter closes at once: sent at close

    with SlowRedis(stores.redis_url, delay=0) as redis:
        _limiter_run(redis.url, scenario)
        assert (redis.sent.count(admit), redis.sent.count(settle)) == (3, 2)
    with redis_client.Redis.from_url(stores.redis_url) as valkey:
        assert valkey.zcard(f"gw:{{{tenant.id}}}:inflight") == 0


def test_requests_at_their_concurrency_limit_are_never_refused_and_settle_exactly(sim, stores, tmp_path):
    """Sixteen clients of a tenant allowed sixteen requests at once, each sending its next request as soon as it
    has its answer: none is refused (the scripts are loaded as the gateway connects to Redis; loaded on first use,
    a settle that found its script missing ran again after the next request's admission, which found the slot
    still held), and the tokens left are what the answers used."""
    key = generate_key()
    config = _config(tmp_path / "c", sim.url, key, concurrent_requests=16, tokens_per_minute=1_000_000)

    async def load(url: str) -> list[dict]:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as session:
            async def requests() -> list[dict]:
                answers = []
                for _ in range(10):
                    async with session.post(f"{url}/v1/chat/completions", json={
                            "model": "small", "messages": HELLO, "max_tokens": 5}) as response:
                        assert response.status == 200, await response.text()
                        answers.append(await response.json())
                return answers

            return [answer for answers in await asyncio.gather(*(requests() for _ in range(16)))
                    for answer in answers]

    gateway = GatewayProcess(config)
    try:
        answers = asyncio.run(load(gateway.url))
        time.sleep(0.3)  # the last settles go by themselves
        remaining = int(gateway.client(key).chat.completions.with_raw_response.create(
            model="small", messages=HELLO, max_tokens=5).headers["x-ratelimit-remaining-tokens"])
        used = sum(answer["usage"]["total_tokens"] for answer in answers)
        assert 1_000_000 - used - 20 <= remaining < 1_000_000 - used  # less this request's own reservation
    finally:
        gateway.stop()


def test_a_settle_on_an_admission_cancelled_before_it_was_sent_still_lands(stores):
    """An admission cancelled while its connection to Redis was still being made (its client gone) takes the settles
    riding on it along: they are sent alone, and the slot they hold is freed."""
    tenant, key = _tenant_object(f"ride-cancel-{time.time_ns() % 10**9}", concurrent_requests=1)

    async def scenario(limiter):
        now = time.time()
        plan = limiter.plan(tenant, key, now, 600)
        first = await limiter.admit(plan, "first", 10, 0, now)
        limiter.settle(first, "first", {"tokens": 10, "budget": 0})
        limiter.client._protocol.abort(ConnectionError("dropped"))  # the next command connects anew, slowly
        second = asyncio.create_task(limiter.admit(plan, "second", 10, 0, now))
        await asyncio.sleep(DELAY / 2)  # connecting: the scripts are being loaded
        second.cancel()
        await asyncio.gather(second, return_exceptions=True)
        await asyncio.sleep(DELAY * 4)

    with SlowRedis(stores.redis_url) as redis:
        _limiter_run(redis.url, scenario)
    with redis_client.Redis.from_url(stores.redis_url) as valkey:
        assert valkey.zcard(f"gw:{{{tenant.id}}}:inflight") == 0

"""Several gateway replicas behind HAProxy (deploy/haproxy/haproxy.cfg), sharing one Redis and one PostgreSQL."""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import subprocess
import time

import openai

from conftest import ROOT, GatewayProcess, free_port, wait_for_http
from gateway.config.keys import generate_key
from test_limits import _away_from_minute_edge, _config, _tenant, _unique

HELLO = [{"role": "user", "content": "hi"}]


def test_replicas_behind_haproxy_share_limits_and_stream(sim, stores, tmp_path):
    assert shutil.which("haproxy"), "tests/run.sh installs haproxy; install it to run this test"
    key, tenant = generate_key(), _unique("replicas")
    config = _config(tmp_path / "c", sim.url, {tenant: _tenant(key, requests_per_minute=40)})
    replicas = [GatewayProcess(config), GatewayProcess(config)]
    port = free_port()
    environment = {**os.environ, "GATEWAY_LISTEN": f"127.0.0.1:{port}",
                   "GATEWAY_1": f"127.0.0.1:{replicas[0].port}", "GATEWAY_2": f"127.0.0.1:{replicas[1].port}"}
    balancer = subprocess.Popen(["haproxy", "-db", "-f", str(ROOT / "deploy/haproxy/haproxy.cfg")],
                                env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        wait_for_http(port, "/health/ready", balancer)
        time.sleep(2.5)  # both replicas pass their first health checks
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0)
        _away_from_minute_edge(20.0)  # the stream and the burst count against one minute
        chunks = list(client.chat.completions.create(model="small", messages=HELLO, stream=True, max_tokens=6))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

        def call(_):
            try:
                client.chat.completions.create(model="small", messages=HELLO, max_tokens=3)
                return 200
            except openai.RateLimitError:
                return 429

        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            statuses = list(pool.map(call, range(80)))
        assert statuses.count(200) == 39 and statuses.count(429) == 41  # 40 a minute, the stream took one
        served = [sum(1 for line in r.log_lines() if line.get("event") == "request" and line.get("status") == 200)
                  for r in replicas]
        assert all(count >= 10 for count in served), served  # both replicas took their share
    finally:
        balancer.terminate()
        balancer.wait(timeout=10)
        for replica in replicas:
            replica.stop()

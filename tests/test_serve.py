"""`gateway serve` with its embedded stores: one gateway per data folder, nothing left behind by a crash, and
`gateway stores` saying where they are."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import redis

from conftest import ROOT, copy_shipped_config, free_port, http_request, wait_for_http


def _servers_on(data_dir: Path) -> dict[str, list[int]]:
    """Valkey and PostgreSQL server processes working in ``data_dir``."""
    found: dict[str, list[int]] = {"valkey": [], "postgres": []}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(entry / "cwd")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state == "Z":
            continue
        if "valkey-server" in command and cwd == str(data_dir / "valkey"):
            found["valkey"].append(int(entry.name))
        elif "postgres" in command and str(data_dir / "postgres") in command and " -D " in command:
            found["postgres"].append(int(entry.name))
    return found


def _serve(config: Path, data: Path, port: int) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}
    env.update(GATEWAY_DATA_DIR=str(data), GATEWAY_SIMULATOR_TTFT_MS="0", GATEWAY_SIMULATOR_ITL_MS="0")
    return subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--port", str(port), "--config-dir",
                             str(config)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _cli(*args: str, data: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env={**os.environ, "GATEWAY_DATA_DIR": str(data)})


def test_one_gateway_per_data_folder_and_no_leftovers_after_a_crash(tmp_path):
    config, data = tmp_path / "config", tmp_path / "data"
    copy_shipped_config(config)
    port = free_port()
    first = _serve(config, data, port)
    try:
        wait_for_http(port, "/health/ready", first, timeout=90)
        assert len(_servers_on(data)["valkey"]) == 1

        shown = _cli("stores", data=data)
        assert shown.returncode == 0, shown.stderr
        urls = dict(line.removeprefix("export ").split("=", 1) for line in shown.stdout.splitlines())
        assert redis.Redis.from_url(urls["REDIS_URL"].strip("'")).ping()

        async def query() -> int:
            connection = await asyncpg.connect(urls["DATABASE_URL"].strip("'"))
            try:
                return await connection.fetchval("SELECT count(*) FROM gateway_schema")
            finally:
                await connection.close()

        assert asyncio.run(query()) >= 1

        same_port = _serve(config, tmp_path / "elsewhere", port)
        output = same_port.communicate(timeout=60)[0].decode()
        assert same_port.returncode != 0 and "in use" in output
        assert not (tmp_path / "elsewhere" / "valkey").exists()  # refused before any store started
        same_folder = _serve(config, data, free_port())
        output = same_folder.communicate(timeout=60)[0].decode()
        assert same_folder.returncode != 0 and f"in use by gateway process {first.pid}" in output
        assert len(_servers_on(data)["valkey"]) == 1

        first.send_signal(signal.SIGKILL)  # no chance to stop its stores
        first.wait()
        leftovers = _servers_on(data)
        assert leftovers["valkey"] and leftovers["postgres"]  # what a crash leaves running

        port = free_port()
        second = _serve(config, data, port)
        try:
            wait_for_http(port, "/health/ready", second, timeout=90)
            running = _servers_on(data)
            assert len(running["valkey"]) == 1 and running["valkey"] != leftovers["valkey"]
            status, ready = http_request(port, "GET", "/health/ready")
            assert status == 200 and ready["stores"] == {"redis": True, "postgres": True}
        finally:
            second.send_signal(signal.SIGTERM)
            output = second.communicate(timeout=60)[0].decode()
        assert "embedded Valkey at redis://" in output and "embedded PostgreSQL at postgresql://" in output
        deadline = time.monotonic() + 20
        while any(_servers_on(data).values()):  # a clean stop stops both, crash or no crash before
            assert time.monotonic() < deadline, _servers_on(data)
            time.sleep(0.2)
        assert _cli("stores", data=data).returncode != 0
    finally:
        if first.poll() is None:
            first.kill()
        for pids in _servers_on(data).values():
            for pid in pids:
                os.kill(pid, signal.SIGKILL)


def test_the_embedded_valkey_listens_where_it_is_told(tmp_path):
    config = copy_shipped_config(tmp_path / "config")
    valkey_port, port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}
    env.update(GATEWAY_DATA_DIR=str(tmp_path / "data"), GATEWAY_VALKEY_PORT=str(valkey_port))
    first = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--port", str(port), "--config-dir",
                              str(config)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for_http(port, "/health/ready", first, timeout=90)
        shown = _cli("stores", data=tmp_path / "data")
        assert f":{valkey_port}" in shown.stdout and redis.Redis(port=valkey_port).ping()
        env["GATEWAY_DATA_DIR"] = str(tmp_path / "other")  # another gateway, the same Valkey port
        second = subprocess.run([sys.executable, "-m", "gateway", "serve", "--port", str(free_port()),
                                 "--config-dir", str(config)], cwd=ROOT, env=env, capture_output=True, text=True,
                                timeout=120)
        assert second.returncode != 0 and "GATEWAY_VALKEY_PORT" in second.stderr + second.stdout
        assert "Traceback" not in second.stderr + second.stdout
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=60)

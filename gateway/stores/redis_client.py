"""The Redis client for a URL: one server, a Sentinel-watched master, or a cluster.

| URL | client |
|---|---|
| ``redis://``, ``rediss://``, ``unix://`` | ``resp.Redis``: one server |
| ``redis+sentinel://host:port,.../<service>[/<db>]`` | ``sentinel.SentinelRedis``: the master the Sentinels name |
| ``redis+cluster://host:port,...`` | ``cluster.ClusterRedis``: each key on its slot's master |
"""

from __future__ import annotations

from urllib.parse import urlparse

from gateway.stores.cluster import ClusterRedis
from gateway.stores.resp import Redis
from gateway.stores.sentinel import SentinelRedis


def redis_client(url: str, connect_timeout: float = 0.5, timeout: float = 1.0) -> Redis | ClusterRedis:
    scheme = urlparse(url).scheme
    if scheme.endswith("+sentinel"):
        return SentinelRedis(url, connect_timeout, timeout)
    if scheme.endswith("+cluster"):
        return ClusterRedis(url, connect_timeout, timeout)
    return Redis(url, connect_timeout, timeout)

"""The one pooled HTTP client a worker uses to call every upstream (vLLM nodes, OpenAI-compatible providers)."""

from __future__ import annotations

import aiohttp

from gateway.config.types import Deployment


class UpstreamClient:
    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None
        self._timeouts: dict[tuple[float, float], aiohttp.ClientTimeout] = {}

    async def open(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=60)
        # Bodies are passed as bytes already encoded with orjson, and responses are relayed as bytes.
        self._session = aiohttp.ClientSession(connector=connector, auto_decompress=True, raise_for_status=False)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def is_open(self) -> bool:
        return self._session is not None and not self._session.closed

    def _timeout(self, deployment: Deployment) -> aiohttp.ClientTimeout:
        key = (deployment.connect_timeout, deployment.read_timeout)
        timeout = self._timeouts.get(key)
        if timeout is None:
            # No total limit: a long stream is fine as long as bytes keep coming within the read timeout.
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=key[0], sock_read=key[1])
            self._timeouts[key] = timeout
        return timeout

    async def post(self, deployment: Deployment, path: str, payload: bytes,
                   headers: dict[str, str] | None = None) -> aiohttp.ClientResponse:
        """Send ``payload`` to ``path`` of the deployment (with ``headers`` instead of its own, when given); the
        caller reads and releases the response."""
        return await self._session.post(deployment.api_base + path, data=payload,
                                        headers=headers or deployment.headers, timeout=self._timeout(deployment))

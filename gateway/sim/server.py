"""Run the simulator: as its own process (``gateway sim``) or inside the gateway's event loop."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket

import uvicorn
import uvloop

from gateway.sim.app import Simulator
from gateway.sim.settings import SimSettings


def run(settings: SimSettings, host: str, port: int, nodes: int = 1) -> None:
    """Serve ``nodes`` simulators, each a node of its own (its adapters, load and faults), on consecutive ports."""
    if nodes == 1:
        uvicorn.run(Simulator(settings), host=host, port=port, log_level="warning", access_log=False,
                    loop="uvloop", http="httptools", lifespan="off")
        return
    servers = [_FleetServer(uvicorn.Config(Simulator(dataclasses.replace(settings)), host=host, port=port + index,
                                           log_level="warning", access_log=False, loop="uvloop", http="httptools",
                                           lifespan="off")) for index in range(nodes)]
    for server in servers:
        server.fleet = servers

    async def serve_all() -> None:
        await asyncio.gather(*(server.serve() for server in servers))

    uvloop.run(serve_all())


class _FleetServer(uvicorn.Server):
    """One node of several in one process: a signal stops them all."""

    fleet: list["_FleetServer"] = []

    def handle_exit(self, sig, frame) -> None:
        for server in self.fleet:
            uvicorn.Server.handle_exit(server, sig, frame)


class _Mounted:
    """The simulator, with other apps under path prefixes (the gateway's embedder at /embedder)."""

    def __init__(self, app, mounts: dict) -> None:
        self.app = app
        self.mounts = mounts

    def __getattr__(self, name: str):
        return getattr(self.app, name)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            for prefix, mounted in self.mounts.items():
                if scope["path"].startswith(prefix + "/"):
                    await mounted({**scope, "path": scope["path"][len(prefix):]}, receive, send)
                    return
        await self.app(scope, receive, send)


class _QuietServer(uvicorn.Server):
    """A server that lives inside another: it leaves signals and log levels to the host server."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


class EmbeddedSimulator:
    """A simulator on an ephemeral loopback port of the current event loop."""

    def __init__(self, settings: SimSettings | None = None, mounts: dict | None = None) -> None:
        self.app = _Mounted(Simulator(settings), mounts or {})
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        config = uvicorn.Config(self.app, log_config=None, log_level=None, access_log=False, lifespan="off")
        self._server = _QuietServer(config)
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._server.serve(sockets=[self._sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        self._server.should_exit = True
        if self._task is not None:
            await self._task
        self._sock.close()

"""Structured logs: one JSON object a line on stdout, for the request log and everything else."""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import select
import sys
import time
from typing import Any

import orjson


_second: tuple[int, str] = (0, "")


def _now() -> str:
    """UTC time as 2026-01-31T12:00:00.123Z; the part up to the second is formatted once a second."""
    global _second
    now = time.time()
    whole = int(now)
    if whole != _second[0]:
        _second = (whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)))
    return f"{_second[1]}.{int((now - whole) * 1000):03d}Z"


def write_json_line(record: dict[str, Any]) -> None:
    """Write one log line; a single write() of under PIPE_BUF bytes, so workers sharing stdout never interleave."""
    os.write(1, orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE))


_requests: list[bytes] = []  # request lines of this turn of the event loop, not yet written


def log_request(record: dict[str, Any]) -> None:
    """The request's log line, written with the other request lines of this turn of the event loop: one write() for
    several answers under load instead of one each."""
    line = orjson.dumps({"time": _now(), "level": "info", "event": "request", **record},
                        option=orjson.OPT_APPEND_NEWLINE)
    if not _requests:
        try:
            asyncio.get_running_loop().call_soon(_write_requests)
        except RuntimeError:  # no event loop: at once
            os.write(1, line)
            return
    _requests.append(line)


def _write_requests() -> None:
    """The lines kept, in writes of whole lines of at most PIPE_BUF bytes: workers sharing stdout never interleave."""
    lines = _requests[:]
    _requests.clear()
    batch, size = [], 0
    for line in lines:
        if batch and size + len(line) > select.PIPE_BUF:
            os.write(1, b"".join(batch))
            batch, size = [], 0
        batch.append(line)
        size += len(line)
    if batch:
        os.write(1, b"".join(batch))


atexit.register(_write_requests)  # lines of the last turn, if the loop stopped before it wrote them


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {"time": _now(), "level": record.levelname.lower(), "logger": record.name,
                                "message": record.getMessage()}
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(line).decode()


def setup_logging(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
    logging.getLogger("uvicorn.access").disabled = True

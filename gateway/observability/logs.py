"""Structured logs: one JSON object a line on stdout, for the request log and everything else."""

from __future__ import annotations

import logging
import os
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


def log_request(record: dict[str, Any]) -> None:
    write_json_line({"time": _now(), "level": "info", "event": "request", **record})


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

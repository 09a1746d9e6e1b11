"""Structured logs: one JSON object a line on stdout, for the request log and everything else."""

from __future__ import annotations

import datetime as dt
import logging
import os
import sys
from typing import Any

import orjson


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


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

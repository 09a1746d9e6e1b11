"""Browser origins allowed to call the gateway (CORS), as admins write them."""

from __future__ import annotations

from urllib.parse import urlsplit


def parse_origins(value: str) -> frozenset[str]:
    """``GATEWAY_CORS_ORIGINS``: origins separated by commas or spaces (``https://app.example.com``), or ``*``."""
    return frozenset(part.strip().rstrip("/") for part in value.replace(",", " ").split() if part.strip())


def same_origin(origin: bytes, host: bytes | None) -> bool:
    """Whether a request's ``Origin`` is the gateway itself (a page it served, such as the console)."""
    return host is not None and urlsplit(origin.decode("latin-1")).netloc.encode("latin-1") == host


def origin_allowed(origin: bytes, host: bytes | None, everyone: frozenset[str], tenant: frozenset[str]) -> bool:
    """Whether a browser on ``origin`` may use a key of a tenant that allows ``tenant`` (``everyone``: the global
    list)."""
    text = origin.decode("latin-1").rstrip("/")
    return (same_origin(origin, host) or "*" in everyone or text in everyone or "*" in tenant or text in tenant)

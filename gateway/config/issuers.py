"""Identity providers whose signed tokens authenticate tenants (tenants.yaml's ``jwt_issuers``), and their signing
keys: given in the config, or read from the issuer's JWKS URL, again every ``refresh_seconds`` and at once (at most
every ``UNKNOWN_KID_RECHECK_SECONDS``) when a token names a key the gateway has not read yet, which is how an
issuer's key rotation is followed without a restart. A failed read keeps the keys last read.

Key sets are kept by URL across config reloads: a reload does not make every replica fetch again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import aiohttp
import jwt

from gateway.config.schema import JwtIssuerSpec
from gateway.config.types import KeyAccess

log = logging.getLogger("gateway.jwt")

UNKNOWN_KID_RECHECK_SECONDS = 10.0
FETCH_TIMEOUT = aiohttp.ClientTimeout(total=5)


class KeySet:
    """An issuer's signing keys by key id."""

    def __init__(self, url: str | None, refresh_seconds: float, document: dict | None = None) -> None:
        self.url = url
        self.refresh_seconds = refresh_seconds
        self.keys: dict[str | None, jwt.PyJWK] = {}
        self.fetched_at = 0.0  # monotonic time of the last read that answered
        self.tried_at = -UNKNOWN_KID_RECHECK_SECONDS  # of the last read asked for
        self.error: str | None = None
        self._reading: asyncio.Task | None = None
        if document is not None:
            self.keys = _parse(document)

    def find(self, kid: str | None) -> jwt.PyJWK | None:
        if kid is None and len(self.keys) == 1:
            return next(iter(self.keys.values()))
        return self.keys.get(kid)

    @property
    def stale(self) -> bool:
        return self.url is not None and time.monotonic() - self.fetched_at > self.refresh_seconds

    def refresh_soon(self) -> None:
        """Read the keys again in the background (a request never waits for a scheduled refresh)."""
        if self.url is not None and self._reading is None and time.monotonic() - self.tried_at > 1.0:
            self._reading = asyncio.get_running_loop().create_task(self._read())

    async def refresh_for_unknown_key(self) -> bool:
        """Read the keys again for a token naming a key not known yet, at most every few seconds; whether a read
        was made (so that the token is worth checking again)."""
        if self.url is None:
            return False
        if self._reading is not None:
            await asyncio.shield(self._reading)
            return True
        if time.monotonic() - self.tried_at < UNKNOWN_KID_RECHECK_SECONDS:
            return False
        self._reading = asyncio.get_running_loop().create_task(self._read())
        await asyncio.shield(self._reading)
        return True

    async def _read(self) -> None:
        self.tried_at = time.monotonic()
        try:
            async with aiohttp.ClientSession(timeout=FETCH_TIMEOUT) as session:
                async with session.get(self.url, headers={"Accept": "application/json"}) as response:
                    if response.status != 200:
                        raise RuntimeError(f"HTTP {response.status}")
                    document = await response.json(content_type=None)
            keys = _parse(document)
            if not keys:
                raise RuntimeError("no key the gateway can use")
            self.keys, self.fetched_at, self.error = keys, time.monotonic(), None
        except Exception as exc:  # the keys last read stay in force
            self.error = f"{type(exc).__name__}: {exc}"
            log.warning("cannot read the signing keys at %s: %s", self.url, self.error)
        finally:
            self._reading = None


def _parse(document: object) -> dict[str | None, jwt.PyJWK]:
    keys: dict[str | None, jwt.PyJWK] = {}
    entries = document.get("keys") if isinstance(document, dict) else None
    for entry in entries if isinstance(entries, list) else ():
        if not isinstance(entry, dict) or entry.get("use", "sig") != "sig" or entry.get("kty") == "oct":
            continue  # encryption keys, and shared secrets (never accepted: anyone holding it could sign)
        try:
            keys[entry.get("kid")] = jwt.PyJWK(entry)
        except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError):
            continue
    return keys


@dataclass(frozen=True)
class JwtIssuer:
    name: str
    issuer: str
    audience: tuple[str, ...]
    algorithms: tuple[str, ...]
    tenant_claim: str | None
    tenant: str | None
    user_claim: str
    leeway: int
    access: KeyAccess
    key_set: KeySet = field(repr=False, compare=False)


_SHARED: dict[str, KeySet] = {}  # by URL: what a reload finds already read


def compile_issuers(specs: list[JwtIssuerSpec]) -> tuple[JwtIssuer, ...]:
    issuers = []
    for spec in specs:
        if spec.jwks_url is not None:
            key_set = _SHARED.get(spec.jwks_url)
            if key_set is None:
                key_set = _SHARED[spec.jwks_url] = KeySet(spec.jwks_url, spec.refresh_seconds)
            key_set.refresh_seconds = spec.refresh_seconds
        else:
            key_set = KeySet(None, spec.refresh_seconds, spec.jwks)
        access = KeyAccess(routes=frozenset(spec.routes) if spec.routes is not None else None,
                           models=tuple(spec.models) if spec.models is not None else None)
        issuers.append(JwtIssuer(spec.name, spec.issuer, tuple(spec.audience), tuple(spec.algorithms),
                                 spec.tenant_claim, spec.tenant, spec.user_claim, spec.leeway_seconds, access, key_set))
    return tuple(issuers)


def static_key_problems(specs: list[JwtIssuerSpec], where) -> list[str]:
    """Issuers whose keys, given in the config, include none the gateway can use."""
    return [f"{where(index)}: jwt issuer '{spec.name}': its jwks has no signing key the gateway can use (RSA, EC "
            "or OKP public keys; shared secrets are never accepted)"
            for index, spec in enumerate(specs) if spec.jwks is not None and not _parse(spec.jwks)]

"""Secrets the config names, never writes: ``env:VAR`` from the environment, ``vault:<mount>/<path>#<field>`` from
HashiCorp Vault (or OpenBao, which speaks the same API) through ``hvac``.

Vault is reached with the usual variables: ``VAULT_ADDR``, ``VAULT_NAMESPACE``, ``VAULT_CACERT`` and one way to log
in: ``VAULT_TOKEN``; AppRole (``VAULT_ROLE_ID`` and ``VAULT_SECRET_ID``, ``VAULT_APPROLE_MOUNT``); or Kubernetes
(``VAULT_K8S_ROLE``, the service account's token at ``VAULT_K8S_JWT_PATH``, ``VAULT_K8S_MOUNT``). A secret is
read from a KV version 2 engine, or version 1 when the mount is one.

Values are read when a config is loaded and again every ``GATEWAY_VAULT_REFRESH_SECONDS`` off the request path;
a value rotated in Vault reaches the next requests without a restart. The login token is renewed before its TTL
runs out (and the gateway logs in again when it cannot be). While Vault cannot be reached, the last good values
stay in use, and the gateway says so (a log line, ``gateway_vault_up``, the readiness check's stores) until it
answers again. Nothing here ever logs, raises or returns a value in a message: only references.

hvac is synchronous: every call here is made from a worker thread, never on the event loop.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

from gateway.observability import metrics

log = logging.getLogger("gateway.secrets")

_VAULT = re.compile(r"vault:(?P<mount>[^/]+)/(?P<path>[^#]+)#(?P<field>.+)")
DEFAULT_K8S_JWT = "/var/run/secrets/kubernetes.io/serviceaccount/token"


class SecretUnavailable(Exception):
    """A reference that cannot be resolved; the message names the reference, never a value."""


class VaultUnreachable(SecretUnavailable):
    """Vault did not answer (down, sealed, a login refused): not a missing secret."""


@dataclass(frozen=True)
class VaultSettings:
    address: str
    namespace: str | None = None
    token: str | None = None
    role_id: str | None = None
    secret_id: str | None = None
    approle_mount: str = "approle"
    k8s_role: str | None = None
    k8s_jwt_path: str = DEFAULT_K8S_JWT
    k8s_mount: str = "kubernetes"
    ca_cert: str | None = None
    refresh_seconds: float = 60.0
    timeout: float = 3.0  # seconds a Vault call may take (a Vault that hangs counts as away)
    byok_mount: str = "secret"  # where the admin API writes tenants' own provider keys
    byok_prefix: str = "gateway/tenants"

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> "VaultSettings | None":
        address = environ.get("VAULT_ADDR")
        if not address:
            return None
        return cls(address=address, namespace=environ.get("VAULT_NAMESPACE") or None,
                   token=environ.get("VAULT_TOKEN") or None, role_id=environ.get("VAULT_ROLE_ID") or None,
                   secret_id=environ.get("VAULT_SECRET_ID") or None,
                   approle_mount=environ.get("VAULT_APPROLE_MOUNT") or "approle",
                   k8s_role=environ.get("VAULT_K8S_ROLE") or None,
                   k8s_jwt_path=environ.get("VAULT_K8S_JWT_PATH") or DEFAULT_K8S_JWT,
                   k8s_mount=environ.get("VAULT_K8S_MOUNT") or "kubernetes",
                   ca_cert=environ.get("VAULT_CACERT") or None,
                   refresh_seconds=float(environ.get("GATEWAY_VAULT_REFRESH_SECONDS") or 60.0),
                   timeout=float(environ.get("GATEWAY_VAULT_TIMEOUT") or 3.0),
                   byok_mount=environ.get("GATEWAY_VAULT_BYOK_MOUNT") or "secret",
                   byok_prefix=(environ.get("GATEWAY_VAULT_BYOK_PREFIX") or "gateway/tenants").strip("/"))

    @property
    def method(self) -> str:
        return "approle" if self.role_id else "kubernetes" if self.k8s_role else "token"


def is_vault(reference: str) -> bool:
    return reference.startswith("vault:")


class Secrets:
    """The values of the config's key references (env: read live; vault: as last read)."""

    def __init__(self, environ: Mapping[str, str] | None = None, vault: VaultSettings | None = None) -> None:
        self.environ = os.environ if environ is None else environ
        self.vault = vault if vault is not None else VaultSettings.from_env(self.environ)
        self._values: dict[str, str] = {}  # vault reference -> value, as last read
        self._versions: dict[str, int] = {}  # mount -> KV version
        self._client = None
        self._renew_at = 0.0
        self._lock = threading.Lock()  # the refresher and a config load may both read
        self.reachable: bool | None = None  # None: Vault not configured, or not asked yet
        self._missing: set[str] = set()  # references Vault answered for without a value (said once each)
        self.last_error: str | None = None

    # -- resolving ----------------------------------------------------------------------------------------------

    def get(self, reference: str) -> str | None:
        """The value of ``reference``; None when it is not set (or not read yet)."""
        if reference.startswith("env:"):
            return self.environ.get(reference[4:]) or None
        return self._values.get(reference)

    def why_missing(self, reference: str) -> str:
        if reference.startswith("env:"):
            return f"environment variable {reference[4:]} not set"
        if self.vault is None:
            return f"{reference}: VAULT_ADDR is not set"
        return f"{reference} could not be read from Vault"

    def load(self, references: Iterable[str], strict: bool) -> None:
        """Read the vault references not read yet (from a worker thread). ``strict``: a SecretUnavailable naming
        each one that cannot be read; else they are left unset (the deployments using them wait)."""
        wanted = [r for r in set(references) if is_vault(r) and r not in self._values]
        if not wanted:
            return
        problems = []
        for reference in sorted(wanted):
            try:
                self._values[reference] = self._read(reference)
            except SecretUnavailable as exc:
                problems.append(str(exc))
        if problems and strict:
            raise SecretUnavailable("; ".join(problems))

    def refresh(self) -> bool:
        """Read every vault reference again (from a worker thread); whether any value changed. While Vault cannot
        be reached the last good values stay."""
        if self.vault is None or not self._values:
            return False
        changed = False
        try:
            self._renew_if_due()
            for reference in list(self._values):
                try:
                    value = self._read(reference, quiet=True)
                except VaultUnreachable:
                    raise
                except SecretUnavailable as exc:  # Vault answered: this secret is gone or closed to us
                    if reference not in self._missing:
                        log.warning("%s; its last good value stays in use", exc)
                    self._missing.add(reference)
                    continue
                self._missing.discard(reference)
                if value != self._values[reference]:
                    self._values[reference] = value
                    changed = True
                    log.info("secret %s changed in Vault: the next requests use the new value", reference)
        except SecretUnavailable as exc:
            self._down(str(exc))
        return changed

    # -- Vault --------------------------------------------------------------------------------------------------

    def _read(self, reference: str, quiet: bool = False) -> str:
        match = _VAULT.fullmatch(reference)
        if match is None:
            raise SecretUnavailable(f"{reference}: not a reference of the form vault:<mount>/<path>#<field>")
        if self.vault is None:
            raise SecretUnavailable(f"{reference}: VAULT_ADDR is not set")
        mount, path, field = match["mount"], match["path"], match["field"]
        import hvac.exceptions

        try:
            with self._lock:
                try:
                    data = self._read_path(mount, path)
                except (hvac.exceptions.Forbidden, hvac.exceptions.Unauthorized):
                    self._client = None  # perhaps the token ran out: log in again, once
                    data = self._read_path(mount, path)
        except hvac.exceptions.InvalidPath:
            self._up()
            raise SecretUnavailable(f"{reference}: no such secret") from None
        except hvac.exceptions.Forbidden:
            self._up()
            raise SecretUnavailable(f"{reference}: permission denied") from None
        except Exception as exc:  # unreachable, sealed, a login refused
            self._down(f"{type(exc).__name__}: {_no_values(str(exc))}")
            raise VaultUnreachable(f"{reference}: Vault cannot be reached ({type(exc).__name__})") from None
        self._up()
        value = data.get(field) if isinstance(data, dict) else None
        if not isinstance(value, str) or not value:
            raise SecretUnavailable(f"{reference}: the secret has no field '{field}'")
        return value

    def _read_path(self, mount: str, path: str) -> dict:
        import hvac.exceptions

        client = self._logged_in()
        version = self._versions.get(mount, 2)
        if version == 2:
            try:
                answer = client.secrets.kv.v2.read_secret_version(path=path, mount_point=mount,
                                                                  raise_on_deleted_version=True)
                self._versions[mount] = 2  # known now: a path missing later is missing, not a version 1 path
                return answer["data"]["data"]
            except hvac.exceptions.InvalidPath:
                if mount in self._versions:
                    raise
                version = 1  # perhaps a version 1 engine: its paths have no data/ in them
        answer = client.secrets.kv.v1.read_secret(path=path, mount_point=mount)
        self._versions[mount] = 1
        return answer["data"]

    def write_tenant_key(self, tenant_id: str, provider: str, key: str) -> str:
        """Keep a tenant's own provider key in Vault (from a worker thread); the reference to it."""
        if self.vault is None:
            raise SecretUnavailable("VAULT_ADDR is not set: tenants' keys are kept in Vault")
        path = f"{self.vault.byok_prefix}/{tenant_id}/{provider}"
        with self._lock:
            self._logged_in().secrets.kv.v2.create_or_update_secret(path=path, secret={"api_key": key},
                                                                     mount_point=self.vault.byok_mount)
        reference = f"vault:{self.vault.byok_mount}/{path}#api_key"
        self._values[reference] = key
        return reference

    def delete_tenant_key(self, reference: str) -> None:
        match = _VAULT.fullmatch(reference)
        if match is None or self.vault is None:
            return
        with self._lock:
            self._logged_in().secrets.kv.v2.delete_metadata_and_all_versions(path=match["path"],
                                                                             mount_point=match["mount"])
        self._values.pop(reference, None)

    def _logged_in(self):
        import hvac

        if self._client is not None:
            return self._client
        settings = self.vault
        client = hvac.Client(url=settings.address, namespace=settings.namespace, timeout=settings.timeout,
                             verify=settings.ca_cert if settings.ca_cert else True)
        if settings.method == "approle":
            answer = client.auth.approle.login(role_id=settings.role_id, secret_id=settings.secret_id,
                                               mount_point=settings.approle_mount)
        elif settings.method == "kubernetes":
            jwt = Path(settings.k8s_jwt_path).read_text().strip()
            answer = client.auth.kubernetes.login(role=settings.k8s_role, jwt=jwt, mount_point=settings.k8s_mount)
        else:
            client.token = settings.token
            answer = {"auth": client.auth.token.lookup_self()["data"]}
            answer["auth"]["lease_duration"] = answer["auth"].get("ttl", 0)
        self._client = client
        self._schedule_renewal(answer["auth"].get("lease_duration") or 0)
        log.info("logged in to Vault at %s (%s)", settings.address, settings.method)
        return client

    def _schedule_renewal(self, ttl: float) -> None:
        # Renew when two thirds of the token's life are gone; a token without a TTL (a root token) never expires.
        self._renew_at = time.monotonic() + ttl * 2 / 3 if ttl else float("inf")

    def _renew_if_due(self) -> None:
        if self._client is None or time.monotonic() < self._renew_at:
            return
        try:
            with self._lock:
                answer = self._client.auth.token.renew_self()
            self._schedule_renewal(answer["auth"].get("lease_duration") or 0)
            metrics.VAULT_TOKEN_RENEWALS.labels("renewed").inc()
        except Exception as exc:  # past its max TTL, or revoked: log in again
            log.info("the Vault token could not be renewed (%s); logging in again", type(exc).__name__)
            metrics.VAULT_TOKEN_RENEWALS.labels("login").inc()
            self._client = None

    def _up(self) -> None:
        if self.reachable is False:
            log.info("Vault reachable again: secrets are refreshed again")
        self.reachable, self.last_error = True, None
        metrics.VAULT_UP.set(1)

    def _down(self, why: str) -> None:
        if self.reachable is not False:
            log.error("Vault unreachable, the last good secrets stay in use: %s", why)
        self.reachable, self.last_error = False, why
        self._client = None
        metrics.VAULT_UP.set(0)


def _no_values(text: str) -> str:
    """An error text without anything that could be a value (hvac quotes what Vault answered)."""
    return text.splitlines()[0][:200] if text else ""

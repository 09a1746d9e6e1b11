"""The live config: the snapshot requests read, kept current as the files and the admin API change.

Two sources, applied differently:

- **The files** (models.yaml, tenants.yaml) are checked every few seconds. An edit is loaded and compiled in a
  worker thread, with every tenant of the admin API compiled again against it, then swapped in whole; an invalid
  edit is refused and the last good config stays in force.
- **The admin API's tenants and keys** (PostgreSQL) are read as changes: only the rows changed since the version
  this gateway has seen, each compiled by itself and patched into the snapshot. A row that cannot be read is
  skipped (logged, counted in ``gateway_directory_rows_rejected``) and never stops the others.

While PostgreSQL is unreachable at start, the tenants and keys of the admin API come from a local copy of the last
directory read (``GATEWAY_DATA_DIR/directory.json``), so known keys keep working.

``current`` is swapped whole, so readers never see half an edit.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import replace
from pathlib import Path

import orjson
from pydantic import ValidationError

from gateway.config.loader import (MODELS_FILE, TENANTS_FILE, ApiTenantRecord, BaseConfig, assemble,
                                   compile_api_tenant, compile_key, key_access, load_base)
from gateway.config.schema import TenantSpec
from gateway.config.types import MEMBER, Adapter, ApiKey, GatewayConfig, KeyAccess, Tenant
from gateway.config.yaml_source import ConfigError
from gateway.observability.metrics import CONFIG_RELOADS, DIRECTORY_REJECTED
from gateway.config.secrets import Secrets

log = logging.getLogger("gateway.config")

UNKNOWN_KEY_RECHECK_SECONDS = 1.0  # an unknown key makes the gateway look for new keys at most this often


class ConfigStore:
    """Holds the snapshot requests read; ``current`` is swapped whole, so readers never see half an edit."""

    def __init__(self, config_dir: Path, simulator_url: str | None = None, directory=None,
                 local_copy: Path | None = None, secrets: Secrets | None = None) -> None:
        self.config_dir = config_dir
        self.simulator_url = simulator_url
        self.secrets = secrets if secrets is not None else Secrets()
        self._secrets_read_at = time.monotonic()
        self.directory = directory  # tenants and keys made through the admin API (a TenantDirectory), if any
        self.local_copy = local_copy
        self.base: BaseConfig = self._load_base()
        self._stamp = self._file_stamp()
        self._records: dict[str, ApiTenantRecord] = {}  # every readable API tenant, by id
        self._api_tenants: dict[str, Tenant] = {}  # those that compile against the current base
        self._rejected: dict[str, str] = {}  # id -> why the row is skipped
        self._api_keys: dict[str, ApiKey] = {}  # sha256 -> key, for every live API key
        self._keys_of: dict[str, set[str]] = {}  # tenant id -> sha256 of its live API keys
        self._version: int | None = None  # the directory version in force (None: nothing read yet)
        self._changed_since_rebuild: set[str] | None = None  # tenant ids changed while a rebuild runs
        self._copy_pending = False
        self._last_recheck = 0.0
        self._recheck: asyncio.Task | None = None  # the look for new keys under way, that others wait for
        self._fine_tuned: dict[str, dict[str, Adapter]] = {}  # tenant id -> its fine-tuned adapters, by name
        self.current: GatewayConfig = assemble(self.base, {}, {})
        self._listeners: list = []  # called with the new config after an edit of the files is in force
        self._log_warnings(self.current)

    @property
    def current(self) -> GatewayConfig:
        return self._current

    @current.setter
    def current(self, config: GatewayConfig) -> None:
        """Every snapshot carries the tenants' fine-tuned adapters besides those of the files and the admin API."""
        self._current = _with_adapters(config, self._fine_tuned)

    def set_fine_tuned(self, adapters: dict[str, dict[str, Adapter]]) -> None:
        """The fine-tuned adapters of every tenant (from the fine-tuning jobs that succeeded), in force at once."""
        if adapters != self._fine_tuned:
            self._fine_tuned = adapters
            self.current = self._current

    def on_files_changed(self, listener) -> None:
        """Call ``listener(config)`` whenever an edit of the files comes into force."""
        self._listeners.append(listener)

    # -- the files ---------------------------------------------------------------------------------------------

    def _load_base(self) -> BaseConfig:
        return load_base(self.config_dir, simulator_url=self.simulator_url, secrets=self.secrets)

    def _file_stamp(self) -> tuple:
        stamp = []
        for name in (MODELS_FILE, TENANTS_FILE):
            try:
                st = (self.config_dir / name).stat()
                stamp.append((st.st_mtime_ns, st.st_size, st.st_ino))
            except OSError:
                stamp.append(None)
        return tuple(stamp)

    async def reload_if_changed(self) -> bool:
        """Load the files again if they changed (in a worker thread); return whether a new config is in force."""
        stamp = self._file_stamp()
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        return await self._rebuild("config reloaded from " + str(self.config_dir))

    async def refresh_secrets(self) -> bool:
        """Read the secrets in Vault again if their refresh is due; a rotated one makes a new config."""
        vault = self.secrets.vault
        if vault is None or time.monotonic() - self._secrets_read_at < vault.refresh_seconds:
            return False
        self._secrets_read_at = time.monotonic()
        if not await asyncio.to_thread(self.secrets.refresh):
            return False
        return await self._rebuild("secrets rotated in Vault are in force")

    async def _rebuild(self, done: str) -> bool:
        """Compile the files and every tenant of the admin API again (in a worker thread) and swap them in."""
        records = dict(self._records)
        self._changed_since_rebuild = set()
        try:
            base, tenants, rejected = await asyncio.to_thread(self._compile_all, records)
        except ConfigError as exc:
            for problem in exc.problems:
                log.error("config rejected, keeping the last good config: %s", problem)
            CONFIG_RELOADS.labels("rejected").inc()
            return False
        finally:
            changed, self._changed_since_rebuild = self._changed_since_rebuild, None
        self.base, self._api_tenants, self._rejected = base, tenants, rejected
        for tenant_id in changed:  # changed by the admin API while the thread ran: compile them again
            self._compile_one(tenant_id)
        self._swap_in_everything()
        CONFIG_RELOADS.labels("applied").inc()
        log.info("%s", done)
        for listener in self._listeners:
            listener(self.current)
        self._log_warnings(self.current)
        return True

    def _compile_all(self, records: dict[str, ApiTenantRecord]) -> tuple[BaseConfig, dict, dict]:
        base = self._load_base()
        tenants, rejected = {}, {}
        for tenant_id, record in records.items():
            try:
                tenants[tenant_id] = compile_api_tenant(base, tenant_id, record)
            except ConfigError as exc:
                rejected[tenant_id] = "; ".join(exc.problems)
        return base, tenants, rejected

    # -- the admin API's tenants and keys -----------------------------------------------------------------------

    def problem_with(self, tenant_id: str, spec: TenantSpec) -> str | None:
        """Why a tenant of the admin API would not compile against the current files, or None."""
        try:
            compile_api_tenant(self.base, tenant_id, ApiTenantRecord(spec))
        except ConfigError as exc:
            return "; ".join(p.split(": ", 1)[-1] for p in exc.problems)
        return None

    def api_spec(self, tenant_id: str) -> TenantSpec | None:
        record = self._records.get(tenant_id)
        return record.spec if record is not None else None

    async def refresh_directory(self) -> bool:
        """Apply what changed in the admin API's directory since the last look; return whether anything did."""
        if self.directory is None:
            return False
        try:
            changes = await self.directory.changes(self._version)
        except Exception as exc:  # PostgreSQL down: keep what is in force, try again on the next round
            if self._version is None and not self._records and self._restore_local_copy():
                return True
            log.warning("cannot read tenants made through the admin API, keeping the current ones: %s", exc)
            return False
        if not changes.full and changes.version == self._version:
            return False
        references = {r for row in changes.tenants.values() for r in _provider_key_references(row.spec_json)}
        if references:  # tenants' own provider keys in Vault: read off the event loop, before they are needed
            await asyncio.to_thread(self.secrets.load, references, False)
        if changes.full:
            self._records, self._api_tenants, self._rejected, self._api_keys, self._keys_of = {}, {}, {}, {}, {}
        for tenant_id in changes.deleted:
            self._forget(tenant_id)
        for tenant_id, row in changes.tenants.items():
            self._remember(tenant_id, row.spec_json, row.created_at)
        for key in changes.keys:
            if key.revoked:
                self._drop_key(key.sha256)
            else:
                self._add_key(key.sha256, _api_key(key.tenant_id, key.name, key.expires_at, key.access))
        self._version = changes.version
        if changes.full:
            self._swap_in_everything()
        else:
            self._swap_in_changes(set(changes.tenants) | changes.deleted, changes.keys)
        self._save_local_copy_soon()
        return True

    def _remember(self, tenant_id: str, spec_json: str, created_at: float | None) -> None:
        if self._changed_since_rebuild is not None:
            self._changed_since_rebuild.add(tenant_id)
        try:
            spec = TenantSpec.model_validate_json(spec_json)
        except ValidationError as exc:
            self._records.pop(tenant_id, None)
            self._api_tenants.pop(tenant_id, None)
            self._reject(tenant_id, str(exc.errors()[0].get("msg")) + f" ({_location(exc)})")
            return
        self._records[tenant_id] = ApiTenantRecord(spec, created_at, spec_json)
        self._compile_one(tenant_id)

    def _compile_one(self, tenant_id: str) -> None:
        record = self._records.get(tenant_id)
        if record is None:
            return
        try:
            self._api_tenants[tenant_id] = compile_api_tenant(self.base, tenant_id, record)
        except ConfigError as exc:
            self._api_tenants.pop(tenant_id, None)
            self._reject(tenant_id, "; ".join(exc.problems))
            return
        if self._rejected.pop(tenant_id, None) is not None:
            DIRECTORY_REJECTED.set(len(self._rejected))

    def _forget(self, tenant_id: str) -> None:
        if self._changed_since_rebuild is not None:
            self._changed_since_rebuild.add(tenant_id)
        self._records.pop(tenant_id, None)
        self._api_tenants.pop(tenant_id, None)
        if self._rejected.pop(tenant_id, None) is not None:  # its keys were revoked with it: changes of their own
            DIRECTORY_REJECTED.set(len(self._rejected))

    def _reject(self, tenant_id: str, why: str) -> None:
        log.error("tenant '%s' of the admin API cannot be loaded and is skipped (the others are not): %s",
                  tenant_id, why)
        self._rejected[tenant_id] = why
        DIRECTORY_REJECTED.set(len(self._rejected))

    def _swap_in_everything(self) -> None:
        self.current = assemble(self.base, self._api_tenants, self._live_keys(self._api_keys.items()))
        DIRECTORY_REJECTED.set(len(self._rejected))

    def _swap_in_changes(self, tenant_ids: set[str], keys: list) -> None:
        """Patch the snapshot for the tenants and keys that changed: a copy of two dicts, no compiling of others."""
        current = self.current
        declared, declared_keys = self.base.tenants, self.base.keys
        tenants = dict(current.tenants)
        all_keys = dict(current.keys)
        origins_touched = False
        for tenant_id in tenant_ids:
            if tenant_id in declared:
                continue  # tenants.yaml wins
            before = tenants.pop(tenant_id, None)
            after = self._api_tenants.get(tenant_id)
            if after is not None:
                tenants[tenant_id] = after
            origins_touched |= bool((before and before.cors_origins) or (after and after.cors_origins))
            for digest in self._keys_of.get(tenant_id, ()):
                if after is not None:
                    all_keys[digest] = self._api_keys[digest]
                elif digest not in declared_keys:
                    all_keys.pop(digest, None)
        for key in keys:
            if key.sha256 in declared_keys:
                continue
            live = self._api_keys.get(key.sha256)
            if live is not None and live.tenant_id in tenants:
                all_keys[key.sha256] = live
            else:
                all_keys.pop(key.sha256, None)
        origins = current.tenant_origins
        if origins_touched:
            origins = frozenset(o for t in tenants.values() if t.cors_origins for o in t.cors_origins)
        self.current = replace(current, tenants=tenants, keys=all_keys, tenant_origins=origins)

    def _add_key(self, digest: str, key: ApiKey) -> None:
        self._api_keys[digest] = key
        self._keys_of.setdefault(key.tenant_id, set()).add(digest)

    def _drop_key(self, digest: str) -> None:
        key = self._api_keys.pop(digest, None)
        if key is not None:
            owned = self._keys_of.get(key.tenant_id)
            if owned is not None:
                owned.discard(digest)
                if not owned:
                    del self._keys_of[key.tenant_id]

    def _live_keys(self, items) -> dict[str, ApiKey]:
        tenants = self.base.tenants
        return {digest: key for digest, key in items
                if (key.tenant_id in tenants or key.tenant_id in self._api_tenants) and digest not in self.base.keys}

    # -- a key the gateway does not know ------------------------------------------------------------------------

    def rejected(self, tenant_id: str) -> str | None:
        """Why the admin API's tenant of this id is stored but skipped (unreadable); None if it is not."""
        return self._rejected.get(tenant_id)

    async def recheck_for_key(self) -> bool:
        """Look for new keys now (files and admin API), at most once a second; return whether anything changed.

        So that a key made a moment ago (``gateway keys create``, or the admin API on another replica) works at
        once instead of after the next polling round.
        """
        if self._recheck is not None:  # a look under way: wait for it rather than refuse (SDKs never retry a 401)
            return await asyncio.shield(self._recheck)
        now = time.monotonic()
        if now - self._last_recheck < UNKNOWN_KEY_RECHECK_SECONDS:
            return False
        self._last_recheck = now
        self._recheck = asyncio.get_running_loop().create_task(self._look_for_keys())
        try:
            return await asyncio.shield(self._recheck)
        finally:
            self._recheck = None

    async def _look_for_keys(self) -> bool:
        changed = await self.reload_if_changed()
        return await self.refresh_directory() or changed

    # -- the local copy of the directory -----------------------------------------------------------------------

    def _save_local_copy_soon(self) -> None:
        """Write the local copy within a second, off the event loop; many changes in a row make one write."""
        if self.local_copy is None or self._copy_pending:
            return
        self._copy_pending = True

        async def save() -> None:
            await asyncio.sleep(1.0)
            self._copy_pending = False
            records, keys, version = dict(self._records), dict(self._api_keys), self._version  # O(n) C copies
            try:
                path = self.local_copy
                await asyncio.to_thread(lambda: _write_private(path, _directory_document(records, keys, version)))
            except OSError as exc:
                log.warning("cannot write the local copy of the directory to %s: %s", self.local_copy, exc)

        asyncio.get_running_loop().create_task(save())

    def _restore_local_copy(self) -> bool:
        if self.local_copy is None or not self.local_copy.exists():
            return False
        try:
            document = orjson.loads(self.local_copy.read_bytes())
            for tenant_id, entry in document["tenants"].items():
                self._remember(tenant_id, orjson.dumps(entry["spec"]).decode(), entry.get("created_at"))
            for key in document["keys"]:
                self._add_key(key["sha256"], _api_key(key["tenant_id"], key["name"], key.get("expires_at"),
                                                      key.get("access")))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.error("cannot read the local copy of the directory %s: %s", self.local_copy, exc)
            return False
        self._swap_in_everything()
        written = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(document.get("written_at", 0)))
        log.warning("PostgreSQL unreachable: the %d tenants and %d keys of the admin API are served from the local "
                    "copy written at %s UTC until it answers", len(self._records), len(self._api_keys), written)
        return True

    # -- watching -----------------------------------------------------------------------------------------------

    @staticmethod
    def _log_warnings(config: GatewayConfig) -> None:
        for warning in config.warnings:
            log.warning("%s", warning)

    async def watch(self, interval: float) -> None:
        """Poll the files and the admin API's version every ``interval`` seconds until cancelled."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.reload_if_changed()
                await self.refresh_directory()
                await self.refresh_secrets()
            except Exception:  # a watcher that dies silently would freeze the config
                log.exception("config watcher failed; will retry")


def _with_adapters(config: GatewayConfig, adapters: dict[str, dict[str, Adapter]]) -> GatewayConfig:
    """``config`` with each tenant's fine-tuned adapters (those of ``adapters`` now, none left from an earlier
    call, the newest last) joined to its own (its own win a name they share), and those it chose
    (``fine_tuned_defaults``, else the newest of a schedule with ``make_default``) used for its requests for their
    base models."""
    stale = {tenant_id for tenant_id, tenant in config.tenants.items()
             if any(a.fine_tuned for a in tenant.adapters.values())}
    if not adapters and not stale:
        return config
    tenants = dict(config.tenants)
    for tenant_id in stale | set(adapters):
        tenant = tenants.get(tenant_id)
        if tenant is None:
            continue
        own = {name: a for name, a in tenant.adapters.items() if not a.fine_tuned}
        defaults = {base: a for base, a in tenant.default_adapters.items() if not a.fine_tuned}
        usable = {name: a for name, a in adapters.get(tenant_id, {}).items() if a.base in config.models}
        for schedule in tenant.fine_tuning_schedules:  # the newest model of a schedule that makes it the default
            made = [a for a in usable.values() if a.schedule == schedule.name and a.base == schedule.model]
            if schedule.make_default and made:
                defaults[schedule.model] = made[-1]
        for base, name in tenant.fine_tuned_defaults.items():  # named by the tenant: these win
            chosen = usable.get(name)
            if chosen is not None and chosen.base == base:
                defaults[base] = chosen
        tenants[tenant_id] = replace(tenant, adapters={**usable, **own}, default_adapters=defaults)
    return replace(config, tenants=tenants)


def _provider_key_references(spec_json: str) -> list[str]:
    try:
        keys = orjson.loads(spec_json).get("provider_keys") or {}
    except (ValueError, AttributeError):
        return []
    return [r for r in keys.values() if isinstance(r, str) and r.startswith("vault:")] if isinstance(keys, dict) \
        else []


def _location(exc: ValidationError) -> str:
    return ".".join(str(part) for part in exc.errors()[0].get("loc", ())) or "spec"


def _api_key(tenant_id: str, name: str, expires_at: float | None, access: dict | None) -> ApiKey:
    """A key of the admin API; one whose stored limits cannot be read any more is a member key of no route."""
    try:
        return compile_key(tenant_id, name, expires_at, key_access(access))
    except ValidationError as exc:
        log.error("key '%s' of tenant '%s' has limits that cannot be read (%s): it may call no route", name,
                  tenant_id, exc.errors()[0]["msg"])
        return compile_key(tenant_id, name, expires_at, KeyAccess(routes=frozenset(), models=()))


def _directory_document(records: dict[str, ApiTenantRecord], keys: dict[str, ApiKey],
                        version: int | None) -> bytes:
    """The local copy's contents: each spec as the directory stored it, so nothing is serialized again."""
    tenants = b",".join(orjson.dumps(tenant_id) + b':{"created_at":' + orjson.dumps(r.created_at) + b',"spec":'
                        + (r.spec_json.encode() if r.spec_json else r.spec.model_dump_json(exclude_none=True).encode())
                        + b"}" for tenant_id, r in records.items())
    head = orjson.dumps({"version": version, "written_at": time.time(),
                         "keys": [{"tenant_id": k.tenant_id, "name": k.name, "sha256": d, "expires_at": k.expires_at,
                                   "access": k.access.view() if k.access is not MEMBER else None}
                                  for d, k in keys.items()]})
    return head[:-1] + b',"tenants":{' + tenants + b"}}"


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` atomically, readable by the gateway's user only (key hashes are inside)."""
    temporary = path.with_suffix(".tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    temporary.replace(path)

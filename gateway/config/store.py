"""The live config: the current snapshot, and a watcher that swaps in valid edits and keeps the last good one."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from gateway.config.loader import MODELS_FILE, TENANTS_FILE, ApiState, load_config
from gateway.config.types import GatewayConfig
from gateway.config.yaml_source import ConfigError
from gateway.observability.metrics import CONFIG_RELOADS

log = logging.getLogger("gateway.config")


class ConfigStore:
    """Holds the snapshot requests read; ``current`` is swapped whole, so readers never see half an edit."""

    def __init__(self, config_dir: Path, simulator_url: str | None = None, directory=None) -> None:
        self.config_dir = config_dir
        self.simulator_url = simulator_url
        self.directory = directory  # tenants and keys made through the admin API (a TenantDirectory), if any
        self._api_state: ApiState | None = None
        self._api_version: int | None = None
        self.current: GatewayConfig = self._load()
        self._stamp = self._file_stamp()
        self._log_warnings(self.current)

    def _load(self) -> GatewayConfig:
        return load_config(self.config_dir, simulator_url=self.simulator_url, api_state=self._api_state)

    def api_state(self) -> ApiState:
        return self._api_state or ApiState()

    async def refresh_directory(self, force: bool = False) -> bool:
        """Merge the admin API's tenants and keys again if they changed; return whether a new config is in force."""
        if self.directory is None:
            return False
        try:
            if not force and await self.directory.version() == self._api_version:
                return False
            version, state = await self.directory.load()
        except Exception as exc:  # PostgreSQL down: keep what is in force, try again on the next round
            log.warning("cannot read tenants made through the admin API, keeping the current ones: %s", exc)
            return False
        previous = self._api_state
        self._api_state = state
        try:
            config = self._load()
        except ConfigError as exc:
            self._api_state = previous
            for problem in exc.problems:
                log.error("config rejected, keeping the last good config: %s", problem)
            CONFIG_RELOADS.labels("rejected").inc()
            return False
        self._api_version = version
        self.current = config
        CONFIG_RELOADS.labels("applied").inc()
        return True

    def _file_stamp(self) -> tuple:
        stamp = []
        for name in (MODELS_FILE, TENANTS_FILE):
            try:
                st = (self.config_dir / name).stat()
                stamp.append((st.st_mtime_ns, st.st_size, st.st_ino))
            except OSError:
                stamp.append(None)
        return tuple(stamp)

    def reload_if_changed(self) -> bool:
        """Load the files again if they changed; return whether a new config is in force."""
        stamp = self._file_stamp()
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            config = self._load()
        except ConfigError as exc:
            for problem in exc.problems:
                log.error("config rejected, keeping the last good config: %s", problem)
            CONFIG_RELOADS.labels("rejected").inc()
            return False
        self.current = config
        CONFIG_RELOADS.labels("applied").inc()
        log.info("config reloaded from %s", self.config_dir)
        self._log_warnings(config)
        return True

    @staticmethod
    def _log_warnings(config: GatewayConfig) -> None:
        for warning in config.warnings:
            log.warning("%s", warning)

    async def watch(self, interval: float) -> None:
        """Poll the files and the admin API's version every ``interval`` seconds until cancelled."""
        while True:
            await asyncio.sleep(interval)
            try:
                self.reload_if_changed()
                await self.refresh_directory()
            except Exception:  # a watcher that dies silently would freeze the config
                log.exception("config watcher failed; will retry")

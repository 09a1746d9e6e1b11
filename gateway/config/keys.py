"""Tenant API keys: made at random, stored only as their SHA-256.

Keys carry 256 bits of randomness, so an unsalted SHA-256 is safe to store and lets the request path find a key
with one hash and one dict lookup.
"""

from __future__ import annotations

import hashlib
import secrets
from pathlib import Path

from gateway.config.loader import TENANTS_FILE
from gateway.config.yaml_source import ConfigError

KEY_PREFIX = "sk-gw-"


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def add_key_to_tenants_file(config_dir: Path, tenant_id: str, key_name: str, expires: str | None = None) -> str:
    """Create a key for ``tenant_id``, write its hash into tenants.yaml (comments kept) and return the key."""
    from ruamel.yaml import YAML  # only this command edits YAML; keep it off the server's import path

    path = config_dir / TENANTS_FILE
    yaml = YAML()
    yaml.preserve_quotes = True
    yaml.indent(mapping=2, sequence=4, offset=2)
    try:
        document = yaml.load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError([f"{path}: cannot be read: {exc.strerror or exc}"]) from None
    tenants = (document or {}).get("tenants") or {}
    if tenant_id not in tenants:
        known = ", ".join(sorted(tenants)) or "none"
        raise ConfigError([f"{path}: no tenant '{tenant_id}' (tenants: {known})"])
    tenant = tenants[tenant_id]
    if tenant.get("keys") is None:
        tenant["keys"] = []
    if any(k.get("name") == key_name for k in tenant["keys"]):
        raise ConfigError([f"{path}: tenant '{tenant_id}' already has a key named '{key_name}'"])
    key = generate_key()
    entry = {"name": key_name, "sha256": hash_key(key)}
    if expires:
        entry["expires"] = expires
    tenant["keys"].append(entry)
    temporary = path.with_suffix(".yaml.tmp")
    with temporary.open("w", encoding="utf-8") as handle:
        yaml.dump(document, handle)
    temporary.replace(path)  # atomic: a running gateway never reads half a file
    return key

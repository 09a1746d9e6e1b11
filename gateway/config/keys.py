"""Tenant API keys: made at random, stored only as their SHA-256.

Keys carry 256 bits of randomness, so an unsalted SHA-256 is safe to store and lets the request path find a key
with one hash and one dict lookup.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from pathlib import Path

from gateway.config.loader import TENANTS_FILE
from gateway.config.schema import KEY_NAME_PATTERN
from gateway.config.yaml_source import ConfigError

KEY_PREFIX = "sk-gw-"
ADMIN_PREFIX = "sk-gw-admin-"


def generate_key(prefix: str = KEY_PREFIX) -> str:
    return prefix + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def add_key_to_tenants_file(config_dir: Path, tenant_id: str | None, key_name: str,
                            expires: str | None = None) -> str:
    """Create a key for ``tenant_id`` (an admin key when None), write its hash into tenants.yaml (comments kept)
    and return the key."""
    from ruamel.yaml import YAML  # only this command edits YAML; keep it off the server's import path

    if not re.fullmatch(KEY_NAME_PATTERN, key_name):
        raise ConfigError([f"--name '{key_name}': use letters, digits, . _ @ and - (up to 64 characters)"])

    path = config_dir / TENANTS_FILE
    yaml = YAML()
    yaml.preserve_quotes = True
    yaml.indent(mapping=2, sequence=4, offset=2)
    yaml.width = 4096  # the admin's lines stay as written: a long one-line mapping is not folded
    try:
        document = yaml.load(path.read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise ConfigError([f"{path}: cannot be read: {exc.strerror or exc}"]) from None
    if tenant_id is None:
        if document.get("admin_keys") is None:
            document["admin_keys"] = []
        keys, owner = document["admin_keys"], "the admin keys"
    else:
        tenants = document.get("tenants") or {}
        if tenant_id not in tenants:
            known = ", ".join(sorted(tenants)) or "none"
            raise ConfigError([f"{path}: no tenant '{tenant_id}' (tenants: {known})"])
        if tenants[tenant_id].get("keys") is None:
            tenants[tenant_id]["keys"] = []
        keys, owner = tenants[tenant_id]["keys"], f"tenant '{tenant_id}'"
    if any(k.get("name") == key_name for k in keys):
        raise ConfigError([f"{path}: {owner} already has a key named '{key_name}' (a key is shown only once, when "
                           f"it is made): make another with a new --name, or leave --name out for a dated one"])
    key = generate_key(ADMIN_PREFIX if tenant_id is None else KEY_PREFIX)
    entry = {"name": key_name, "sha256": hash_key(key)}
    if expires:
        entry["expires"] = expires
    keys.append(entry)
    temporary = path.with_suffix(".yaml.tmp")
    with temporary.open("w", encoding="utf-8") as handle:
        yaml.dump(document, handle)
    temporary.replace(path)  # atomic: a running gateway never reads half a file
    return key

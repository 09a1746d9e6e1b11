"""Finding a pool's nodes on a Tailscale mesh: the online peers carrying a tag, from ``tailscale status --json``.

The documented CLI is read rather than the local API's socket: it is what an operator can run to see the same,
and it works wherever the tailscale daemon does. Its JSON has ``Self`` and a ``Peer`` map whose entries carry
``HostName``, ``DNSName`` (the MagicDNS name, with a trailing dot), ``TailscaleIPs``, ``Online`` and ``Tags``.
"""

from __future__ import annotations

import asyncio
import json
import logging

from gateway.config.types import TailscaleDiscovery

log = logging.getLogger("gateway.fleet")


class DiscoveryFailed(Exception):
    pass


async def tailscale_nodes(discovery: TailscaleDiscovery, timeout: float = 10.0) -> dict[str, str]:
    """name -> base URL of each online peer with the tag (the node's MagicDNS name, or its first address)."""
    try:
        process = await asyncio.create_subprocess_exec(
            discovery.command, "status", "--json", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        async with asyncio.timeout(timeout):
            output, errors = await process.communicate()
    except (OSError, TimeoutError) as exc:
        raise DiscoveryFailed(f"cannot run `{discovery.command} status --json`: {exc}") from None
    if process.returncode != 0:
        raise DiscoveryFailed(f"`{discovery.command} status --json` failed: {errors.decode(errors='replace')[:300]}")
    try:
        status = json.loads(output)
    except ValueError as exc:
        raise DiscoveryFailed(f"`{discovery.command} status --json` printed no JSON: {exc}") from None
    return peers_with_tag(status, discovery)


def peers_with_tag(status: dict, discovery: TailscaleDiscovery) -> dict[str, str]:
    nodes = {}
    peers = status.get("Peer") if isinstance(status, dict) else None
    for peer in (peers or {}).values():
        if not isinstance(peer, dict) or not peer.get("Online") or discovery.tag not in (peer.get("Tags") or ()):
            continue
        dns = (peer.get("DNSName") or "").rstrip(".")
        addresses = [a for a in peer.get("TailscaleIPs") or () if isinstance(a, str)]
        host = dns or (addresses[0] if addresses else None)
        if not host:
            continue
        if ":" in host:  # an IPv6 address
            host = f"[{host}]"
        name = peer.get("HostName") or host
        nodes[f"{name}:{discovery.port}"] = f"{discovery.scheme}://{host}:{discovery.port}{discovery.path}"
    return nodes

"""The inference fleet: pools of vLLM nodes, their state, adapter loads and where each request runs.

Off the request path, a task refreshes every node every ``refresh_seconds`` (health, models and adapters, load) and,
for a pool with discovery, the list of nodes on the mesh. On the request path, ``candidates`` orders a pool's nodes
for one request (placement.py) as deployments the forwarding stage tries in turn, and ``prepare`` makes sure the
request's adapter is registered on the node it is about to use: with vLLM's runtime API (``POST
/v1/load_lora_adapter``, ``/v1/unload_lora_adapter``), one load at a time per node and adapter (concurrent requests
wait for the same load), never more adapters on a node than its slots (``max_lora``), unloading an idle one first.

A node that fails its checks is drained (no new requests) and probed until it is healthy; so is one whose
requests keep failing (``failures_before_drain`` in a row; one refused connection is enough).
"""

from __future__ import annotations

import asyncio
import logging
import time

import aiohttp
import orjson

from gateway.config.types import Adapter, Deployment, FleetConfig, Pool
from gateway.observability import metrics
from gateway.upstreams.fleet.discovery import DiscoveryFailed, tailscale_nodes
from gateway.upstreams.fleet.node import DOWN, DRAINED, PROBING, UP, Node, read_metrics, read_models
from gateway.upstreams.fleet.placement import Placement, Popularity, victim

log = logging.getLogger("gateway.fleet")

CHECK_TIMEOUT = aiohttp.ClientTimeout(total=5)
LOAD_ATTEMPTS = 3  # loads of one adapter for one request, should other loads keep taking its slot


class AdapterLoadFailed(Exception):
    """``reason`` is for the log and the admin; ``public`` is what a tenant may read: never the node's own words,
    which name where adapters live on the nodes."""

    def __init__(self, node: str, adapter: str, reason: str, public: str | None = None) -> None:
        super().__init__(f"node {node} could not load adapter {adapter}: {reason}")
        self.node, self.adapter, self.reason = node, adapter, reason
        self.public = public or reason


class NodeRefused(Exception):
    def __init__(self, path: str, status: int, text: str) -> None:
        super().__init__(f"{path} answered {status}: {text[:300]}")
        self.status = status


class Fleet:
    def __init__(self, config: FleetConfig) -> None:
        self.config = config
        self.placement = Placement(config.strategy, config.queue_weight, config.kv_weight)
        self.nodes: dict[str, dict[str, Node]] = {}  # pool -> name -> node
        self.popularity: dict[str, Popularity] = {}
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task | None = None
        self._deployments: dict[tuple[str, str, str], Deployment] = {}  # (deployment, model, node) -> one a node
        self.update(config)

    # -- lifecycle --------------------------------------------------------------------------------------------------

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30))
        await self.refresh()
        self._task = asyncio.create_task(self._refresh_forever())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    def update(self, config: FleetConfig) -> None:
        """A new config: pools and the nodes the files list follow it (discovered nodes stay until the mesh says)."""
        self.config = config
        self.placement = Placement(config.strategy, config.queue_weight, config.kv_weight)
        self._deployments.clear()
        for name in list(self.nodes):
            if name not in config.pools:
                for node in self.nodes.pop(name).values():
                    node.gone = True
        for pool in config.pools.values():
            nodes = self.nodes.setdefault(pool.name, {})
            self.popularity.setdefault(pool.name, Popularity())
            listed = {n.name: n for n in pool.nodes}
            for name, node in list(nodes.items()):
                if node.source == "config" and name not in listed:
                    self._remove(pool.name, name)
            for spec in pool.nodes:
                node = nodes.get(spec.name)
                if node is None:
                    nodes[spec.name] = Node(pool.name, spec.name, spec.url, spec.api_key, spec.weight, "config",
                                            pool.max_loras)
                else:
                    node.url, node.api_key, node.weight, node.slots_default = (spec.url, spec.api_key, spec.weight,
                                                                               pool.max_loras)

    def _remove(self, pool: str, name: str) -> None:
        node = self.nodes[pool].pop(name, None)
        if node is not None:
            node.gone = True
            metrics.FLEET_NODE_UP.labels(pool, name).set(0)
            log.info("fleet node %s of pool %s removed", name, pool)

    # -- keeping the picture current --------------------------------------------------------------------------------

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.refresh_seconds)
            try:
                await self.refresh()
            except Exception:  # a dead refresher would freeze every node's state
                log.exception("fleet refresh failed; will retry")

    async def refresh(self) -> None:
        for pool in self.config.pools.values():
            if pool.discovery is not None:
                await self._discover(pool)
        nodes = [node for pool in self.nodes.values() for node in pool.values()]
        await asyncio.gather(*(self.check(node) for node in nodes))

    async def _discover(self, pool: Pool) -> None:
        try:
            found = await tailscale_nodes(pool.discovery)
        except DiscoveryFailed as exc:
            log.warning("fleet pool %s: discovery failed, keeping the nodes it knows: %s", pool.name, exc)
            return
        nodes = self.nodes[pool.name]
        for name, node in list(nodes.items()):
            if node.source == "tailscale" and name not in found:
                self._remove(pool.name, name)
        for name, url in found.items():
            if name not in nodes:
                nodes[name] = Node(pool.name, name, url, pool.api_key, 1.0, "tailscale", pool.max_loras)
                log.info("fleet node %s of pool %s found on the mesh at %s", name, pool.name, url)

    async def check(self, node: Node) -> None:
        """Health, models and adapters, load: a node that answers all three is up."""
        root = node.url.removesuffix("/v1")
        headers = {"Authorization": f"Bearer {node.api_key}"} if node.api_key else {}
        changes = node.changes  # a load or unload finishing while the node answers makes its list stale
        try:
            async with self._session.get(root + "/health", headers=headers, timeout=CHECK_TIMEOUT) as response:
                if response.status != 200:
                    raise RuntimeError(f"/health answered {response.status}")
            async with self._session.get(node.url + "/models", headers=headers, timeout=CHECK_TIMEOUT) as response:
                if response.status != 200:
                    raise RuntimeError(f"/v1/models answered {response.status}")
                served, registered = read_models(orjson.loads(await response.read()))
            async with self._session.get(root + "/metrics", headers=headers, timeout=CHECK_TIMEOUT) as response:
                load = read_metrics((await response.read()).decode()) if response.status == 200 else None
        except Exception as exc:  # whatever the node did wrong, it is not usable until it answers again
            self._mark(node, DOWN if node.state in (PROBING, DOWN) else DRAINED, f"{type(exc).__name__}: {exc}")
            return
        pool = self.config.pools.get(node.pool)
        if pool is not None and pool.model not in served:
            self._mark(node, DOWN, f"does not serve {pool.model} (serves {', '.join(sorted(served)) or 'nothing'})")
            return
        node.served = served
        # The node's own list wins over the gateway's memory, except for loads and unloads the gateway has under way,
        # and unless one of them finished while the node was answering: that list is older than the gateway's view.
        if node.changes == changes and not node.reserved:
            node.adapters = (registered - node.evicting) | {a for a in node.loading if a in node.adapters}
        if load is not None:
            node.num_running, node.num_waiting, node.kv_usage = load.running, load.waiting, load.kv_usage
            node.running_adapters, node.waiting_adapters = load.running_adapters, load.waiting_adapters
            node.max_lora = load.max_lora
            node.slot_freed.set()  # what the node says runs may have changed
        node.checked_at = time.monotonic()
        metrics.FLEET_NODE_QUEUE.labels(node.pool, node.name).set(node.num_waiting)
        metrics.FLEET_NODE_KV.labels(node.pool, node.name).set(node.kv_usage)
        metrics.FLEET_NODE_ADAPTERS.labels(node.pool, node.name).set(len(node.adapters))
        self._mark(node, UP, None)

    def _mark(self, node: Node, state: str, error: str | None) -> None:
        if state != node.state:
            if state == UP:
                log.info("fleet node %s of pool %s is up%s", node.name, node.pool,
                         " again" if node.state != PROBING else "")
                node.failures = 0
            elif node.state in (UP, PROBING):
                log.warning("fleet node %s of pool %s is %s: %s", node.name, node.pool, state, error)
            node.state = state
        node.error = error
        metrics.FLEET_NODE_UP.labels(node.pool, node.name).set(1 if state == UP else 0)

    # -- the request path -------------------------------------------------------------------------------------------

    def candidates(self, deployment: Deployment, adapter: Adapter | None) -> list[Deployment]:
        """The pool's nodes, best first, as deployments of their own."""
        nodes = self.nodes.get(deployment.pool)
        if not nodes:
            return []
        lora = adapter.lora_name if adapter is not None else None
        if lora is not None:
            self.popularity[deployment.pool].seen(lora)
        ordered = self.placement.order(list(nodes.values()), lora, self.popularity[deployment.pool])
        return [self._deployment_of(deployment, node) for node in ordered]

    def _deployment_of(self, deployment: Deployment, node: Node) -> Deployment:
        key = (deployment.name, deployment.model, node.name)
        made = self._deployments.get(key)
        if made is None or made.api_base != node.url:
            headers = {k: v for k, v in deployment.headers.items() if k != "Authorization"}
            if node.api_key:
                headers["Authorization"] = f"Bearer {node.api_key}"
            made = self._deployments[key] = Deployment(
                name=f"{deployment.name}@{node.name}", model=deployment.model,
                upstream_model=deployment.upstream_model, api_base=node.url, api_key=node.api_key, headers=headers,
                connect_timeout=deployment.connect_timeout, read_timeout=deployment.read_timeout, priority=0,
                is_simulator=False, pool=deployment.pool, node=node.name)
        return made

    def node_of(self, deployment: Deployment) -> Node | None:
        return self.nodes.get(deployment.pool, {}).get(deployment.node)

    async def prepare(self, deployment: Deployment, adapter: Adapter | None) -> str:
        """Make sure ``adapter`` is registered on the deployment's node; the model name to send it."""
        if adapter is None:
            return deployment.upstream_model
        node = self.node_of(deployment)
        if node is None:
            raise AdapterLoadFailed(deployment.node, adapter.name, "the node left the pool")
        lora = adapter.lora_name
        node.last_used[lora] = time.monotonic()
        if node.resident(lora):
            metrics.FLEET_ADAPTER_REQUESTS.labels("resident").inc()
            return lora
        metrics.FLEET_ADAPTER_REQUESTS.labels("loaded").inc()
        # Until this request runs on it, the adapter it waited for is not idle: a load that comes next must not
        # evict it in the moment between the load's end and this request's turn.
        node.awaiting[lora] += 1
        try:
            for _ in range(LOAD_ATTEMPTS):
                loading = node.loading.get(lora)
                if loading is None:
                    loading = node.loading[lora] = asyncio.get_running_loop().create_future()
                    asyncio.get_running_loop().create_task(self._load(node, adapter, loading))
                await asyncio.shield(loading)  # the load goes on for the others if this request is cancelled
                if node.resident(lora):
                    return lora
        finally:
            node.awaiting[lora] -= 1
            if node.awaiting[lora] <= 0:
                del node.awaiting[lora]
        raise AdapterLoadFailed(node.name, adapter.name, "unloaded again as soon as it was loaded",
                                "the node is too busy with other adapters")

    def lost(self, deployment: Deployment, lora: str) -> None:
        """The node answered that it does not know ``lora`` (restarted, or unloaded by someone else): not resident."""
        node = self.node_of(deployment)
        if node is not None and lora in node.adapters and lora not in node.loading:
            log.warning("fleet node %s no longer has adapter %s; it is loaded again", node.name, lora)
            node.adapters.discard(lora)
            node.changes += 1
            node.slot_freed.set()

    async def _load(self, node: Node, adapter: Adapter, done: asyncio.Future) -> None:
        lora = adapter.lora_name
        try:
            async with asyncio.timeout(self.config.load_timeout):
                # A slot is held before the load is sent, with no wait between the count and the hold: concurrent
                # loads never count the same free slot, and an adapter being unloaded still takes its slot.
                while node.occupied() >= node.slots:
                    if node.evicting and len(node.adapters | node.reserved) < node.slots:
                        node.slot_freed.clear()  # an unload under way makes the room: wait for it, evict no more
                        await node.slot_freed.wait()
                        continue
                    await self._evict(node)
                node.reserved.add(lora)
                node.changes += 1
                try:
                    await self._call(node, "/load_lora_adapter", {"lora_name": lora, "lora_path": adapter.path},
                                     already_fine="has already been loaded")
                finally:
                    node.reserved.discard(lora)
        except Exception as exc:
            reason = str(exc) if not isinstance(exc, TimeoutError) else f"no answer in {self.config.load_timeout:g} s"
            public = (f"the node refused it ({exc.status})" if isinstance(exc, NodeRefused)
                      else reason if isinstance(exc, TimeoutError) else "the node could not be asked")
            metrics.FLEET_ADAPTER_LOAD_FAILURES.labels(node.pool, node.name).inc()
            log.warning("fleet node %s could not load adapter %s: %s", node.name, lora, reason)
            done.set_exception(AdapterLoadFailed(node.name, adapter.name, reason, public))
            done.exception()  # retrieved here: waiters get it too
        else:
            node.adapters.add(lora)
            node.changes += 1
            metrics.FLEET_ADAPTER_LOADS.labels(node.pool, node.name).inc()
            done.set_result(None)
        finally:
            node.loading.pop(lora, None)

    async def _evict(self, node: Node) -> None:
        """Unload the adapter whose absence hurts least, so that a load fits the node's slots; while every slot is
        busy with running requests, wait for one to finish (within the load's timeout)."""
        while True:
            evicted = victim(node, self.popularity[node.pool], by_frequency=self.config.strategy == "adapter_aware")
            if evicted is not None:
                break
            node.slot_freed.clear()
            await node.slot_freed.wait()
        node.adapters.discard(evicted)  # no new request goes to it from now
        node.evicting.add(evicted)
        node.changes += 1
        metrics.FLEET_ADAPTER_EVICTIONS.labels(node.pool, node.name).inc()
        try:
            await self._call(node, "/unload_lora_adapter", {"lora_name": evicted}, already_fine="cannot be found")
        finally:
            node.evicting.discard(evicted)
            node.changes += 1
            node.slot_freed.set()

    async def _call(self, node: Node, path: str, body: dict, already_fine: str) -> None:
        headers = {"Content-Type": "application/json"}
        if node.api_key:
            headers["Authorization"] = f"Bearer {node.api_key}"
        async with self._session.post(node.url + path, data=orjson.dumps(body), headers=headers) as response:
            text = (await response.read()).decode(errors="replace")
            if response.status != 200 and already_fine not in text:
                raise NodeRefused(path, response.status, text)

    def started(self, deployment: Deployment, lora: str | None) -> None:
        node = self.node_of(deployment)
        if node is not None:
            node.inflight += 1
            if lora is not None:
                node.inflight_by_adapter[lora] += 1
            metrics.FLEET_NODE_INFLIGHT.labels(node.pool, node.name).inc()

    def finished(self, deployment: Deployment, lora: str | None, failed: bool, unreachable: bool) -> None:
        node = self.node_of(deployment)
        if node is None:
            return
        node.inflight -= 1
        if lora is not None:
            node.inflight_by_adapter[lora] -= 1
            if node.inflight_by_adapter[lora] <= 0:
                del node.inflight_by_adapter[lora]
                node.slot_freed.set()
        metrics.FLEET_NODE_INFLIGHT.labels(node.pool, node.name).dec()
        if not failed:
            node.failures = 0
            return
        node.failures = self.config.failures_before_drain if unreachable else node.failures + 1
        if node.failures >= self.config.failures_before_drain and node.state == UP:
            self._mark(node, DRAINED, f"{node.failures} failed requests in a row")

    # -- the admin's view and hands ---------------------------------------------------------------------------------

    def view(self) -> dict:
        return {"object": "fleet", "strategy": self.config.strategy,
                "pools": {name: {"model": pool.model, "nodes": [n.view() for n in self.nodes.get(name, {}).values()]}
                          for name, pool in self.config.pools.items()}}

    def find(self, name: str) -> Node | None:
        return next((pool[name] for pool in self.nodes.values() if name in pool), None)

    def drain(self, name: str, drained: bool) -> Node | None:
        node = self.find(name)
        if node is not None:
            node.drained_by_admin = drained
            log.info("fleet node %s %s by an admin", name, "drained" if drained else "returned to service")
        return node

    async def pin(self, name: str, adapter: Adapter, pinned: bool) -> Node | None:
        """Keep ``adapter`` on node ``name`` (loaded now, never evicted), or let it go."""
        node = self.find(name)
        if node is None:
            return None
        if pinned:
            node.pinned.add(adapter.lora_name)
            deployment = Deployment(name=f"pin@{name}", model=adapter.base, upstream_model="", api_base=node.url,
                                    api_key=None, headers={}, connect_timeout=5, read_timeout=60, priority=0,
                                    is_simulator=False, pool=node.pool, node=node.name)
            await self.prepare(deployment, adapter)
        else:
            node.pinned.discard(adapter.lora_name)
        return node


__all__ = ["AdapterLoadFailed", "Fleet", "UP", "DRAINED", "DOWN", "PROBING"]

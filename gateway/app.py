"""The gateway as an ASGI application. The lifespan opens and closes everything the request path uses."""

from __future__ import annotations

import asyncio
import gc
import time
import logging

import asyncpg

from gateway.api.admin import build_admin_router
from gateway.api.cors import Cors
from gateway.api.finetune import build_fine_tuning_router, build_trainer_router
from gateway.api.fleet import build_fleet_router
from gateway.api.reports import build_reports_router
from gateway.api.responses import build_responses_router
from gateway.api.retrieval import build_retrieval_router
from gateway.api.router_admin import build_router_admin
from gateway.api.guard import AdminAuth, BodyGuard, MetricsAuth
from gateway.api.identity import RequestIdentity
from gateway.api.openai import OpenAIRoutes
from gateway.api.ops import build_ops_app
from gateway.asgi import Receive, Scope, Send
from gateway.config.store import ConfigStore
from gateway.observability import metrics
from gateway.observability.logs import setup_logging
from gateway.errors import GatewayError
from gateway.pipeline.build import build_pipeline
from gateway.pipeline.auth import identify, identify_again
from gateway.upstreams.select import DeploymentSelector
from gateway.settings import Settings
from gateway.pipeline.internal import InternalCalls
from gateway.finetune.jobs import Jobs
from gateway.finetune.runner import Runner
from gateway.finetune.schedule import Scheduler
from gateway.finetune.service import FineTuning, training_row
from gateway.finetune.storage import Storage
from gateway.retrieval.catalog import Catalog
from gateway.retrieval.embed_app import Embedder
from gateway.retrieval.semantic import SemanticIndex
from gateway.retrieval.service import Retrieval
from gateway.retrieval.vectors import Vectors
from gateway.sim.server import EmbeddedSimulator
from gateway.sim.settings import SimSettings
from gateway import tokens
from gateway.stores.cache import ResponseCache
from gateway.stores.directory import TenantDirectory
from gateway.stores.embedded import EmbeddedServers
from gateway.stores.ledger import Ledger
from gateway.config.secrets import Secrets
from gateway.stores.limits import Limiter
from gateway.stores.responses import ResponseStore
from gateway.stores import partitions, route_window
from gateway.stores.resp import ReplyError
from gateway.routing.share import READ as SHARE_READ, WINDOW, ShareKeeper
from gateway.upstreams.client import UpstreamClient
from gateway.upstreams.fleet import Fleet

log = logging.getLogger("gateway")


class Gateway:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.client = UpstreamClient()
        self.simulator: EmbeddedSimulator | None = None
        self.embedder = Embedder()  # the embedded embedding model, in a process of its own once first used
        self.config: ConfigStore | None = None
        self.routes: OpenAIRoutes | None = None
        self.limiter: Limiter | None = None
        self.cache: ResponseCache | None = None
        self.ledger: Ledger | None = None
        self.embedded: EmbeddedServers | None = None
        self.directory: TenantDirectory | None = None
        self.fleet: Fleet | None = None
        self.providers = None  # LiteLLM's path (gateway.upstreams.providers), loaded only when the config needs it
        self.secrets = Secrets()
        self._watcher: asyncio.Task | None = None
        self._share_keeper: asyncio.Task | None = None
        self._partition_keeper: asyncio.Task | None = None
        self.shares = ShareKeeper()  # thresholds kept at a target share of large-model calls
        self.retrieval: Retrieval | None = None  # files, vector stores, chats with retrieval (needs PostgreSQL)
        self.semantic: SemanticIndex | None = None  # the semantic cache's index (on Qdrant, beside retrieval)
        self.fine_tuning: FineTuning | None = None  # fine-tuning jobs and this gateway's trainer (needs PostgreSQL)
        self.responses: ResponseStore | None = None  # stored responses of the Responses API (needs PostgreSQL)
        self.selector = DeploymentSelector()  # deployments' failures and cooldowns, shown by /api/v1/status
        self.admin_auth = AdminAuth(lambda: self.config.current, settings.admin_key, settings.stateless)
        self.ops = build_ops_app(self.readiness, self.store_status,
                                 [build_admin_router(self), build_fleet_router(self), build_router_admin(self),
                                  build_reports_router(self), build_retrieval_router(self),
                                  build_fine_tuning_router(self), build_trainer_router(self),
                                  build_responses_router(lambda: self.config.current, lambda: self.responses)],
                                 self._choices)
        self._off_hot_path = BodyGuard(self.ops, self.admin_auth, settings.max_admin_body_bytes,
                                       settings.max_body_bytes, MetricsAuth(self.admin_auth, settings.metrics_key),
                                       self._tenant_key)
        self._http = RequestIdentity(Cors(self._dispatch, self._cors_origins),
                                     lambda scope: self.routes.answers_for_itself(scope))
        self._origins: tuple[object, frozenset[str]] = (None, frozenset())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)

    async def _dispatch(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = self.routes.match(scope["path"])
        if route is not None:
            await self.routes(scope, receive, send, route)
        else:
            await self._off_hot_path(scope, receive, send)

    async def _tenant_key(self, scope: Scope) -> None:
        """A 401 / 403 for a request whose key no tenant has (a key made a moment ago is looked for first)."""
        try:
            identify(scope, self.config.current, None)
        except GatewayError as refused:
            await identify_again(scope, self.config, refused, None)

    def _choices(self) -> dict[str, list[str]]:
        """Values the admin API accepts that depend on the config, for its OpenAPI document."""
        config = self.config.current
        return {"tier": sorted(config.tiers),
                "profile": sorted(config.router.profiles) if config.router is not None else [],
                "chat_model": sorted(name for name, m in config.models.items() if m.type == "chat"),
                "guard_model": sorted(name for name, m in config.models.items() if m.type in ("chat", "moderation")),
                "fleet_model": sorted(name for name, m in config.models.items() if any(d.pool for d in m.deployments))}

    def _cors_origins(self) -> frozenset[str]:
        """Origins a browser may call from: the global list and every tenant's own (computed once per config)."""
        config = self.config.current
        if self._origins[0] is not config:
            self._origins = (config, config.cors_origins | config.tenant_origins)
        return self._origins[1]

    def _files_changed(self, config) -> None:
        """The fleet follows models.yaml: made, changed or closed with it; LiteLLM is loaded once a provider needs
        it (in a worker thread)."""
        if config.uses_litellm and self.providers is None:
            async def load() -> None:
                self.providers = await asyncio.to_thread(_load_providers)

            asyncio.get_running_loop().create_task(load())
        if config.fleet is not None and self.fleet is not None:
            self.fleet.update(config.fleet)
        elif config.fleet is not None:
            self.fleet = Fleet(config.fleet)
            asyncio.get_running_loop().create_task(self.fleet.start())
        elif self.fleet is not None:
            fleet, self.fleet = self.fleet, None
            asyncio.get_running_loop().create_task(fleet.close())

    async def forget_tenant_state(self, tenant_id: str) -> list[str]:
        """Drop a tenant's counters, slots and cached answers in Redis, its documents and semantic cache entries, its
        fine-tuning jobs and adapters: its id is about to start a new tenant. Returns what could not be cleared now
        (logged)."""
        left: list[str] = []
        if self.responses is not None:
            try:
                await self.responses.forget_tenant(tenant_id)
            except Exception as exc:
                log.warning("cannot delete tenant %s's stored responses now: %s", tenant_id, exc)
                left.append("stored responses")
        if self.retrieval is not None:
            try:
                await self.retrieval.forget_tenant(tenant_id)
                await self.semantic.forget_tenant(tenant_id)
            except Exception as exc:  # PostgreSQL or Qdrant away: said, and the Redis part still done
                log.warning("cannot delete tenant %s's documents now: %s", tenant_id, exc)
                left.append("documents")
        if self.fine_tuning is not None:
            try:
                await self.fine_tuning.jobs.forget_tenant(tenant_id)
                await self.fine_tuning.storage.remove(tenant_id)  # its datasets, checkpoints and adapters
                await self.fine_tuning.runner.refresh_adapters()
            except Exception as exc:
                log.warning("cannot delete tenant %s's fine-tuning jobs and adapters now: %s", tenant_id, exc)
                left.append("fine-tuning jobs and adapters")
        if self.limiter is None:
            return left
        try:
            deleted = await self.limiter.forget(tenant_id)
        except (OSError, ConnectionError, asyncio.TimeoutError) as exc:
            log.warning("cannot clear tenant %s's counters and cache in Redis now: %s", tenant_id, exc)
            return left + ["counters and cached answers"]
        log.info("cleared %d Redis keys of tenant %s", deleted, tenant_id)
        return left

    def readiness(self) -> dict[str, bool]:
        checks = {
            "config": self.config is not None,
            "upstream_client": self.client.is_open,
            "simulator": self.simulator is not None or not self.settings.builtin_simulator,
        }
        if self.settings.redis_failure_mode == "closed":
            checks["redis"] = self.limiter is not None and self.limiter.available
        return checks

    def known_tiers(self) -> frozenset[str]:
        return self.config.current.tiers

    def store_status(self) -> dict[str, bool]:
        """Reachability of the stores; the gateway keeps serving without them (see docs/configuration.md: limits and
        the ledger)."""
        status = {
            "redis": self.limiter is not None and self.limiter.available,
            "postgres": self.ledger is not None and self.ledger.reachable,
        }
        if self.secrets.vault is not None:  # while it is away, the last good secrets are in use
            status["vault"] = self.secrets.reachable is not False
        return status

    async def startup(self) -> None:
        settings = self.settings
        if settings.builtin_simulator:
            self.simulator = EmbeddedSimulator(
                SimSettings(ttft_ms=settings.simulator_ttft_ms, itl_ms=settings.simulator_itl_ms),
                mounts={"/embedder": self.embedder},  # builtin:embedder, the embedded embedding model
            )
            await self.simulator.start()
        if not settings.stateless:
            await self._open_stores()
        self.config = await asyncio.to_thread(
            ConfigStore, settings.config_dir, self.simulator.url if self.simulator else None, self.directory,
            settings.data_dir / "directory.json" if self.directory else None, self.secrets)
        if self.config.current.uses_litellm:
            self.providers = await asyncio.to_thread(_load_providers)
        await self.config.refresh_directory()
        await self.client.open()
        if self.config.current.fleet is not None:
            self.fleet = Fleet(self.config.current.fleet)
            await self.fleet.start()
        self.config.on_files_changed(self._files_changed)
        pipeline = build_pipeline(
            self.config, self.client, self.limiter, self.ledger, self.cache, max_body_bytes=settings.max_body_bytes,
            log_prompts=settings.log_prompts, refuse_without_redis=settings.redis_failure_mode == "closed",
            fleet=lambda: self.fleet, providers=lambda: self.providers, shares=self.shares, selector=self.selector,
            retrieval=lambda: self.retrieval, semantic=lambda: self.semantic, calls=lambda: calls,
        )
        calls = InternalCalls(lambda: pipeline, lambda: self.config.current)  # the gateway's requests to itself
        self.routes = OpenAIRoutes(self.config, pipeline, settings.max_body_bytes, lambda: self.responses)
        if self.directory is not None:
            vectors = Vectors(path=(settings.data_dir / "qdrant").resolve(), url=settings.qdrant_url,
                              api_key=settings.qdrant_api_key)
            self.retrieval = Retrieval(
                Catalog(self.directory.pool_for_reports, vectors.where), vectors,
                calls, settings.retrieval_model,
                lambda: self.config.current, settings.indexing_concurrency)
            self.retrieval.start()
            self.semantic = SemanticIndex(self.retrieval.vectors)
            self.fine_tuning = self._fine_tuning()
            self.fine_tuning.runner.start()
            self.fine_tuning.scheduler.start()
        self._watcher = asyncio.create_task(self.config.watch(settings.reload_interval))
        self._share_keeper = asyncio.create_task(self._keep_shares(settings.share_interval))
        if self.directory is not None:
            self._partition_keeper = asyncio.create_task(self._keep_partitions())
        gc.freeze()  # what startup built lives for good: keep the collector from walking it on every pass
        models = self.config.current.models.values()
        log.info("gateway ready: %d models (%d on the built-in simulator), %d tenants, config from %s",
                 len(models), sum(m.simulated for m in models), len(self.config.current.tenants),
                 settings.config_dir)

    def _fine_tuning(self) -> FineTuning:
        settings = self.settings
        storage = Storage(settings.finetune_storage or str((settings.data_dir / "finetune").resolve()))
        jobs = Jobs(self.directory.pool_for_reports)

        async def file_exists(tenant_id: str, file_id: str) -> bool:
            return await self.retrieval.catalog.file(tenant_id, file_id) is not None

        def bill(job: dict, cost: float, seconds: float, status: int) -> None:
            self.ledger.record(training_row(job, cost, seconds, status))
            asyncio.get_running_loop().create_task(self._add_spend(job["tenant_id"], cost))

        async def read_file(tenant_id: str, file_id: str) -> dict | None:
            return await self.retrieval.catalog.file(tenant_id, file_id, with_content=True)

        runner = Runner(jobs, storage, lambda: self.config.current, settings.data_dir / "training", file_exists,
                        self.config.set_fine_tuned, bill, settings.finetune_trainer, settings.finetune_stale_seconds,
                        settings.finetune_beat_seconds, self.spent_usd)
        return FineTuning(jobs, storage, runner, Scheduler(jobs, storage, read_file, lambda: self.config.current,
                                                             settings.finetune_schedule_seconds, self.spent_usd),
                          read_file)

    async def spent_usd(self, tenant_id: str) -> float | None:
        """A tenant's spend this month as Redis counts it; None while Redis cannot say."""
        try:
            return await self.limiter.spend_nano(tenant_id, time.time()) / 1e9
        except (OSError, ConnectionError, asyncio.TimeoutError, ReplyError):
            return None

    async def _add_spend(self, tenant_id: str, cost: float) -> None:
        try:
            await self.limiter.add_spend(tenant_id, int(cost * 1e9), time.time())
        except (OSError, ConnectionError, asyncio.TimeoutError, ReplyError) as exc:  # the ledger has the row still
            log.warning("a training's spend cannot be counted in tenant %s's budget now: %s", tenant_id, exc)

    async def _open_stores(self) -> None:
        settings = self.settings
        redis_url, database_url = settings.redis_url, settings.database_url
        if redis_url is None or database_url is None:
            self.embedded = EmbeddedServers(settings.data_dir, settings.valkey_port)
            redis_url = redis_url or self.embedded.start_redis()
            database_url = database_url or self.embedded.start_postgres()
        tokens.load()
        self.limiter = Limiter(redis_url, self.settings.limits_headroom_seconds,
                               self.settings.limits_lease_seconds)
        metrics.BUDGETS.source = self.limiter.budget_shares
        await self.limiter.ping()
        self.cache = ResponseCache(self.limiter.client)
        self.ledger = Ledger(database_url, settings.data_dir / "spool", settings.ledger_batch_size,
                             settings.ledger_flush_seconds)
        await self.ledger.start()
        self.directory = TenantDirectory(database_url)
        self.responses = ResponseStore(self.directory.pool_for_reports, database_url,
                                       settings.responses_retention_days)

    async def _keep_shares(self, interval: float) -> None:
        """Recalibrate the thresholds of scopes with a target share of large-model calls from their recent scores
        (shared through Redis by the replicas; this process's own while Redis cannot be reached)."""
        shares, shared = self.shares, True
        while True:
            try:  # every ``interval``, or as soon as enough new scores have come
                await asyncio.wait_for(shares.due.wait(), interval)
            except asyncio.TimeoutError:
                pass
            pending = shares.take_pending()
            if not shares.targets:
                continue
            windows = {scope: list(shares.local.get(scope, ())) for scope in shares.targets}
            if self.limiter is not None:
                try:
                    windows = await route_window.exchange(self.limiter.client, pending, shares.targets, WINDOW,
                                                          SHARE_READ)
                    shared = True
                except (OSError, ConnectionError, asyncio.TimeoutError, ReplyError) as exc:
                    if shared:
                        log.warning("route scores cannot be shared through Redis now (%s): thresholds follow this "
                                    "replica's own", exc)
                    shared = False
            router = self.config.current.router
            if router is not None:
                for scope, window in windows.items():
                    shares.update(scope, router.classifier.thresholds, window)

    async def _keep_partitions(self, interval: float = 3600.0) -> None:
        """The ledger's daily partitions made ahead and dropped past the retention, now and every hour."""
        while True:
            try:
                pool = await self.directory.pool_for_reports()
                await partitions.maintain(pool, self.settings.ledger_partitions_ahead,
                                          self.settings.ledger_retention_days)
                await self.responses.sweep()
            except (OSError, ConnectionError, asyncio.TimeoutError, asyncpg.PostgresError) as exc:
                log.warning("ledger partitions cannot be kept now (%s); trying again in %gs", exc, interval)
            await asyncio.sleep(interval)

    async def shutdown(self) -> None:
        """Runs after the server has let the requests under way finish: flush the ledger, then close."""
        for task in (self._watcher, self._share_keeper, self._partition_keeper):
            if task is not None:
                task.cancel()
        if self.fine_tuning is not None:
            await self.fine_tuning.scheduler.stop()
            await self.fine_tuning.runner.stop()  # jobs training here stop, and fail with that reason
        if self.retrieval is not None:
            await self.retrieval.close()  # indexing jobs stop (taken up again by the next start)
        if self.fleet is not None:
            await self.fleet.close()
        if self.ledger is not None:
            await self.ledger.close()
        if self.responses is not None:
            await self.responses.close()
        if self.directory is not None:
            await self.directory.close()
        if self.limiter is not None:
            await self.limiter.close()
        await self.client.close()
        self.embedder.close()
        if self.simulator is not None:
            await self.simulator.stop()
        if self.embedded is not None:
            self.embedded.stop()

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:  # a bad config or a port in use: say why, and do not start
                    log.error("gateway failed to start: %s", exc)
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return


def _load_providers():
    """LiteLLM's path: seconds to import, so only for a config that needs it, and off the event loop."""
    from gateway.upstreams.providers import Providers

    log.info("LiteLLM loaded for the providers that do not speak OpenAI's API")
    return Providers()


def create_app(settings: Settings | None = None) -> Gateway:
    """The app factory uvicorn calls in every worker; settings come from GATEWAY_* variables."""
    settings = settings or Settings.from_env()
    setup_logging(settings.log_level)
    return Gateway(settings)

"""Prometheus metrics of the gateway, served on /metrics."""

from __future__ import annotations

from typing import Callable

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

REQUESTS = Counter(
    "gateway_requests", "Requests answered, by tenant, model asked, route and status.",
    ["tenant", "model", "route", "status"],
)
TOKENS = Counter("gateway_tokens", "Tokens used, by tenant, model and kind.", ["tenant", "model", "kind"])
COST = Counter("gateway_cost_usd", "What requests cost in US dollars (all their upstream calls), by tenant and model.",
               ["tenant", "model"])
LATENCY = Histogram(
    "gateway_request_duration_seconds", "Time from request to the last byte of the answer.", ["route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
OVERHEAD = Histogram(
    "gateway_overhead_seconds", "The gateway's own time per request (total minus the upstream's).",
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1),
)
UPSTREAM_ERRORS = Counter(
    "gateway_upstream_errors", "Failed upstream calls, by deployment and kind.", ["deployment", "kind"]
)
DEPLOYMENT_COOLDOWNS = Counter(
    "gateway_deployment_cooldowns", "Times a deployment was passed over after failing repeatedly.", ["deployment"]
)
FALLBACKS = Counter("gateway_fallbacks", "Upstream calls retried on another deployment or model.", ["model"])
ROUTED = Counter("gateway_routed_requests", "Requests for a router alias, by complexity and chosen model.",
                 ["complexity", "model"])
CASCADES = Counter("gateway_cascades", "Answers of a small model judged unsure and asked again of a larger one.",
                   ["from_model", "to_model"])
GUARDRAIL_ACTIONS = Counter("gateway_guardrail_actions", "Guardrails that fired, by tenant, rule and action.",
                            ["tenant", "rule", "action"])
CACHE_LOOKUPS = Counter("gateway_cache_lookups", "Response cache lookups, by result (hit, miss, bypass, error).",
                        ["result"])
CACHE_BYTES = Counter("gateway_cache_bytes", "Bytes of answers stored in and served from the response cache.",
                      ["direction"])
CONFIG_RELOADS = Counter("gateway_config_reloads", "Config reloads, by result.", ["result"])
LIMIT_REFUSALS = Counter("gateway_limit_refusals", "Requests refused by a limit, by tenant and limit.",
                         ["tenant", "limit"])
LIMIT_LEASES = Counter("gateway_limit_leases", "Leases on a tenant's limits asked of Redis, by tenant and outcome "
                       "(granted; refused: the tenant is past half of a limit; failed).", ["tenant", "outcome"])
REDIS_UP = Gauge("gateway_redis_up", "1 while Redis answers; 0 while limits cannot be counted.")
REDIS_UP.set(1)
REDIS_ERRORS = Counter("gateway_redis_errors", "Redis calls that failed.")
UNSETTLED = Gauge("gateway_unsettled_requests",
                  "Finished requests whose slots and usage Redis has not taken yet (sent again until it does).")
POSTGRES_UP = Gauge("gateway_postgres_up", "1 while the ledger's PostgreSQL takes rows; 0 while they are spooled.")
LEDGER_ROWS = Counter("gateway_ledger_rows", "Usage rows, by where they went.", ["outcome"])
LEDGER_SPOOLED = Gauge("gateway_ledger_spooled_rows", "Usage rows waiting in the spool for PostgreSQL.")
LEDGER_DEAD_LETTERS = Counter("gateway_ledger_dead_letter_rows",
                              "Usage rows PostgreSQL refused for their data, set aside in the dead-letter file.")
DIRECTORY_REJECTED = Gauge("gateway_directory_rows_rejected",
                           "Tenants of the admin API that cannot be loaded and are skipped (see the log).")


FLEET_NODE_UP = Gauge("gateway_fleet_node_up", "1 while a fleet node takes requests.", ["pool", "node"])
FLEET_NODE_INFLIGHT = Gauge("gateway_fleet_node_inflight", "The gateway's requests on a node now.", ["pool", "node"])
FLEET_NODE_QUEUE = Gauge("gateway_fleet_node_waiting", "Requests waiting on a node, as it last said.",
                         ["pool", "node"])
FLEET_NODE_KV = Gauge("gateway_fleet_node_kv_cache_usage", "A node's KV-cache use (0 to 1), as it last said.",
                      ["pool", "node"])
FLEET_NODE_ADAPTERS = Gauge("gateway_fleet_node_adapters", "Adapters registered on a node.", ["pool", "node"])
FLEET_ADAPTER_REQUESTS = Counter("gateway_fleet_adapter_requests",
                                 "Requests with an adapter, by whether it was on the node already (resident) or had "
                                 "to be loaded (loaded).", ["result"])
FLEET_ADAPTER_LOADS = Counter("gateway_fleet_adapter_loads", "Adapters loaded onto a node.", ["pool", "node"])
FLEET_ADAPTER_EVICTIONS = Counter("gateway_fleet_adapter_evictions", "Adapters unloaded to make room.",
                                  ["pool", "node"])
FLEET_ADAPTER_LOAD_FAILURES = Counter("gateway_fleet_adapter_load_failures", "Adapter loads that failed.",
                                      ["pool", "node"])


VAULT_UP = Gauge("gateway_vault_up", "1 while Vault answers; 0 while the last good secrets are used.")
VAULT_TOKEN_RENEWALS = Counter("gateway_vault_token_renewals", "Vault tokens renewed, or replaced by a new login.",
                               ["result"])
PROVIDER_CALLS = Counter("gateway_provider_calls", "Calls through LiteLLM to providers that do not speak OpenAI's "
                                                   "API, by provider and status.", ["provider", "status"])


class BudgetShares:
    """``gateway_tenant_budget_used_ratio``: read from the limiter when /metrics is scraped, never on the request
    path."""

    def __init__(self) -> None:
        self.source: Callable[[], dict[str, float]] = dict

    def describe(self):
        return []

    def collect(self):
        family = GaugeMetricFamily("gateway_tenant_budget_used_ratio", "Share of a tenant's monthly budget spent or "
                                   "reserved, as of its last request in this worker.", labels=["tenant"])
        for tenant, share in sorted(self.source().items()):
            family.add_metric([tenant], share)
        yield family


BUDGETS = BudgetShares()
REGISTRY.register(BUDGETS)


class LabelCache:
    """Children of a labelled metric, looked up once per label set (``labels()`` costs a lock and a tuple)."""

    __slots__ = ("_metric", "_children")

    def __init__(self, metric) -> None:
        self._metric = metric
        self._children: dict[tuple[str, ...], object] = {}

    def __call__(self, *labels: str):
        child = self._children.get(labels)
        if child is None:
            child = self._children[labels] = self._metric.labels(*labels)
        return child


requests_by = LabelCache(REQUESTS)
tokens_by = LabelCache(TOKENS)
cost_by = LabelCache(COST)
latency_by = LabelCache(LATENCY)
cache_lookups_by = LabelCache(CACHE_LOOKUPS)
cache_bytes_by = LabelCache(CACHE_BYTES)

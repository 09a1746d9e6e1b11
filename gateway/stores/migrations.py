"""The gateway's PostgreSQL schema, created and migrated by the gateway itself.

Migrations run in order, each once, under an advisory lock, so several workers or replicas starting together
apply each exactly once. Never edit a migration that has shipped: add the next one.
"""

from __future__ import annotations

import asyncpg

from gateway.stores import rollups

MIGRATIONS: tuple[str, ...] = (
    # 1: the usage ledger
    """
    CREATE TABLE usage_ledger (
        id bigserial PRIMARY KEY,
        request_id text NOT NULL UNIQUE,
        created_at timestamptz NOT NULL,
        tenant_id text,
        key_name text,
        route text NOT NULL,
        model_requested text,
        model text,
        deployment text,
        upstream_model text,
        routing_rule text,
        complexity text,
        prompt_tokens integer NOT NULL DEFAULT 0,
        completion_tokens integer NOT NULL DEFAULT 0,
        cost_usd numeric(18, 9) NOT NULL DEFAULT 0,
        latency_ms real,
        upstream_ms real,
        overhead_ms real,
        cache_hit boolean NOT NULL DEFAULT false,
        cascaded boolean,
        confidence real,
        fallbacks text,
        stream boolean NOT NULL DEFAULT false,
        status integer NOT NULL,
        error_type text
    );
    CREATE INDEX usage_ledger_tenant_time ON usage_ledger (tenant_id, created_at);
    """,
    # 2: tenants and keys made through the admin API
    """
    CREATE TABLE api_tenants (
        id text PRIMARY KEY,
        spec jsonb NOT NULL,
        created_at timestamptz NOT NULL DEFAULT now(),
        updated_at timestamptz NOT NULL DEFAULT now()
    );
    CREATE TABLE api_keys (
        sha256 text PRIMARY KEY,
        tenant_id text NOT NULL,
        name text NOT NULL,
        expires_at timestamptz,
        created_at timestamptz NOT NULL DEFAULT now(),
        revoked_at timestamptz
    );
    CREATE UNIQUE INDEX api_keys_live_name ON api_keys (tenant_id, name) WHERE revoked_at IS NULL;
    CREATE TABLE api_changes (id integer PRIMARY KEY DEFAULT 1, version bigint NOT NULL DEFAULT 0,
                              CHECK (id = 1));
    INSERT INTO api_changes DEFAULT VALUES;
    """,
    # 3: routing: the classifier's score (for calibrating thresholds from real traffic) and every upstream call
    # of a request that made more than one (fallbacks, cascades)
    """
    ALTER TABLE usage_ledger ADD COLUMN route_score real, ADD COLUMN attempts jsonb;
    CREATE INDEX usage_ledger_routed ON usage_ledger (tenant_id, created_at) WHERE complexity IS NOT NULL;
    """,
    # 4: every admin change stamped with its version, so that replicas read only what changed; deleted tenants
    # kept in a history (their usage stays readable once the id is used again)
    """
    ALTER TABLE api_tenants ADD COLUMN version bigint NOT NULL DEFAULT 0;
    ALTER TABLE api_keys ADD COLUMN version bigint NOT NULL DEFAULT 0;
    CREATE INDEX api_tenants_version ON api_tenants (version);
    CREATE INDEX api_keys_version ON api_keys (version);
    CREATE TABLE api_tenant_history (
        tenant_id text NOT NULL,
        spec jsonb,
        created_at timestamptz NOT NULL,
        deleted_at timestamptz NOT NULL DEFAULT now(),
        version bigint NOT NULL
    );
    CREATE INDEX api_tenant_history_version ON api_tenant_history (version);
    CREATE INDEX api_tenant_history_tenant ON api_tenant_history (tenant_id, deleted_at);
    """,
    # 5: the fleet: which vLLM node answered, and with which of the tenant's adapters
    """
    ALTER TABLE usage_ledger ADD COLUMN node text, ADD COLUMN adapter text;
    """,
    # 6: who paid the provider: NULL the gateway, 'tenant' when the tenant's own key was used
    """
    ALTER TABLE usage_ledger ADD COLUMN paid_by text;
    """,
    # 7: what the router keeps of a request a small model answered (hashed words, signals), to learn from; and
    # the tenants' ratings of answers
    """
    ALTER TABLE usage_ledger ADD COLUMN route_example jsonb;
    CREATE TABLE feedback (
        tenant_id text NOT NULL,
        request_id text NOT NULL,
        rating smallint NOT NULL,
        comment text,
        created_at timestamptz NOT NULL,
        updated_at timestamptz NOT NULL,
        PRIMARY KEY (tenant_id, request_id)
    );
    """,
    # 8: reports over every tenant and the newest requests (the console) read by time
    """
    CREATE INDEX usage_ledger_time ON usage_ledger (created_at);
    """,
    # 9: the ledger partitioned by day (the rows already there become one partition, up to tomorrow; later days
    # get partitions of their own, made ahead by the gateway: see partitions.py), a default partition for rows
    # no day's partition takes, and the daily rollups the reports read, filled from the rows already there and
    # kept by a trigger. A request's row is unique by (request_id, created_at): a replayed row has both.
    """
    ALTER TABLE usage_ledger RENAME TO usage_ledger_unpartitioned;
    ALTER INDEX usage_ledger_tenant_time RENAME TO usage_ledger_unpartitioned_tenant_time;
    ALTER INDEX usage_ledger_time RENAME TO usage_ledger_unpartitioned_time;
    CREATE TABLE usage_ledger (LIKE usage_ledger_unpartitioned INCLUDING DEFAULTS) PARTITION BY RANGE (created_at);
    ALTER SEQUENCE usage_ledger_id_seq OWNED BY usage_ledger.id;  -- the old partition may be dropped one day
    CREATE UNIQUE INDEX usage_ledger_request ON usage_ledger (request_id, created_at);
    CREATE INDEX usage_ledger_tenant_time ON usage_ledger (tenant_id, created_at);
    CREATE INDEX usage_ledger_time ON usage_ledger (created_at);
    CREATE TABLE usage_ledger_default PARTITION OF usage_ledger DEFAULT;
    DO $migrate$
    DECLARE tomorrow timestamptz := date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' + interval '1 day';
    BEGIN
        INSERT INTO usage_ledger_default SELECT * FROM usage_ledger_unpartitioned WHERE created_at >= tomorrow;
        DELETE FROM usage_ledger_unpartitioned WHERE created_at >= tomorrow;
        EXECUTE format('ALTER TABLE usage_ledger ATTACH PARTITION usage_ledger_unpartitioned '
                       'FOR VALUES FROM (MINVALUE) TO (%L)', tomorrow);
    END
    $migrate$;
    """ + rollups.TABLES + rollups.backfill() + rollups.trigger(),
    # 10: retrieval: tenants' files, vector stores and the files in them (their vectors live in Qdrant), and what a
    # chat with retrieval read, in its ledger row
    """
    CREATE TABLE retrieval_files (
        tenant_id text NOT NULL,
        id text NOT NULL,
        filename text NOT NULL,
        purpose text NOT NULL,
        bytes integer NOT NULL,
        content bytea NOT NULL,
        created_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (tenant_id, id)
    );
    CREATE TABLE vector_stores (
        tenant_id text NOT NULL,
        id text NOT NULL,
        name text,
        metadata jsonb,
        created_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (tenant_id, id)
    );
    CREATE TABLE vector_store_files (
        tenant_id text NOT NULL,
        store_id text NOT NULL,
        file_id text NOT NULL,
        status text NOT NULL,
        last_error text,
        chunks integer NOT NULL DEFAULT 0,
        claimed_at timestamptz,
        created_at timestamptz NOT NULL DEFAULT now(),
        updated_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (tenant_id, store_id, file_id),
        FOREIGN KEY (tenant_id, store_id) REFERENCES vector_stores ON DELETE CASCADE,
        FOREIGN KEY (tenant_id, file_id) REFERENCES retrieval_files ON DELETE CASCADE
    );
    ALTER TABLE usage_ledger ADD COLUMN retrieval jsonb;
    """,
    # 11: indexing's progress, kept as it goes: shown on the file in its store, and where a job taken up again
    # after a stop resumes; and which Qdrant the file's vectors go to (only gateways writing there index it)
    """
    ALTER TABLE vector_store_files ADD COLUMN chunks_done integer NOT NULL DEFAULT 0,
                                   ADD COLUMN chunks_total integer,
                                   ADD COLUMN indexer text;
    """,
    # 12: OpenAI's file batches, a file's attributes in a store (for search filters), and stores that expire
    """
    CREATE TABLE vector_store_file_batches (
        tenant_id text NOT NULL,
        store_id text NOT NULL,
        id text NOT NULL,
        cancelled boolean NOT NULL DEFAULT false,
        created_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (tenant_id, id),
        FOREIGN KEY (tenant_id, store_id) REFERENCES vector_stores ON DELETE CASCADE
    );
    ALTER TABLE vector_store_files ADD COLUMN attributes jsonb, ADD COLUMN batch_id text;
    ALTER TABLE vector_stores ADD COLUMN expires_after_days integer,
                              ADD COLUMN last_active_at timestamptz NOT NULL DEFAULT now();
    """,
    # 13: stored responses of OpenAI's Responses API (gateway.stores.responses)
    """
    CREATE TABLE stored_responses (
        tenant_id text NOT NULL,
        id text NOT NULL,
        previous_id text,
        created_at timestamptz NOT NULL,
        expires_at timestamptz NOT NULL,
        input_items bytea NOT NULL,
        response bytea NOT NULL,
        PRIMARY KEY (tenant_id, id)
    );
    CREATE INDEX stored_responses_expiry ON stored_responses (expires_at);
    """,
    # 14: the guardrails a request met: why it was refused, and the rules that fired (never the text they found)
    """
    ALTER TABLE usage_ledger ADD COLUMN refusal_reason text, ADD COLUMN guardrails jsonb;
    """,
    # 15: the tenant's end user a request was made for (the body's user, Open WebUI's forwarded user header)
    """
    ALTER TABLE usage_ledger ADD COLUMN end_user text;
    """,
    # 16: keys with a role and limits (routes, models, tools), and the audit log of every admin action: who, what,
    # when, the state before and after
    """
    ALTER TABLE api_keys ADD COLUMN access jsonb;
    CREATE TABLE audit_log (
        id bigserial PRIMARY KEY,
        created_at timestamptz NOT NULL DEFAULT now(),
        actor text NOT NULL,
        actor_role text NOT NULL,
        actor_tenant text,
        action text NOT NULL,
        tenant_id text,
        target text,
        status integer NOT NULL,
        before jsonb,
        after jsonb
    );
    CREATE INDEX audit_log_time ON audit_log (created_at);
    CREATE INDEX audit_log_tenant ON audit_log (tenant_id, created_at);
    """,
    # 17: the end users' daily rollup, which the usage report's by_user reads
    rollups.with_users(),
    # 18: fine-tuning jobs, their events and checkpoints (OpenAI's fine-tuning API, a tenant's own adapters)
    """
    CREATE TABLE fine_tuning_jobs (
        id text PRIMARY KEY,
        tenant_id text NOT NULL,
        created_at timestamptz NOT NULL DEFAULT now(),
        model text NOT NULL,
        training_file text NOT NULL,
        validation_file text,
        hyperparameters jsonb NOT NULL,
        suffix text,
        seed integer NOT NULL,
        metadata jsonb,
        status text NOT NULL,
        fine_tuned_model text UNIQUE,
        adapter_location text,
        error jsonb,
        trained_tokens bigint,
        training_examples integer,
        started_at timestamptz,
        finished_at timestamptz,
        runner text,
        heartbeat_at timestamptz,
        gpu_seconds real NOT NULL DEFAULT 0,
        cancel_requested boolean NOT NULL DEFAULT false,
        storage text NOT NULL,
        restarts integer NOT NULL DEFAULT 0
    );
    CREATE INDEX fine_tuning_jobs_tenant ON fine_tuning_jobs (tenant_id, created_at, id);
    CREATE INDEX fine_tuning_jobs_queue ON fine_tuning_jobs (status, created_at) WHERE status IN ('queued', 'running');
    CREATE TABLE fine_tuning_events (
        id bigserial PRIMARY KEY,
        job_id text NOT NULL REFERENCES fine_tuning_jobs (id) ON DELETE CASCADE,
        created_at timestamptz NOT NULL DEFAULT now(),
        level text NOT NULL,
        type text NOT NULL,
        message text NOT NULL,
        data jsonb
    );
    CREATE INDEX fine_tuning_events_job ON fine_tuning_events (job_id, id);
    CREATE TABLE fine_tuning_checkpoints (
        id text PRIMARY KEY,
        job_id text NOT NULL REFERENCES fine_tuning_jobs (id) ON DELETE CASCADE,
        created_at timestamptz NOT NULL DEFAULT now(),
        step integer NOT NULL,
        metrics jsonb NOT NULL,
        location text NOT NULL
    );
    CREATE INDEX fine_tuning_checkpoints_job ON fine_tuning_checkpoints (job_id, step);
    """,
    # 19: a job run by a trainer off the gateways reports with a token of its run (its SHA-256 kept here); a job
    # made by a tenant's schedule names it (its model may become the tenant's default by itself); a job keeps the
    # price of a GPU-second in force when it was made, which its training is billed at by whichever gateway bills
    "ALTER TABLE fine_tuning_jobs ADD COLUMN report_token text, ADD COLUMN schedule text, "
    "ADD COLUMN gpu_second_usd double precision",
    # 20: a job whose trainer could not start it waits a while before it is tried again
    "ALTER TABLE fine_tuning_jobs ADD COLUMN not_before timestamptz",
)

_LOCK = 7_301_244_771  # advisory lock id of the gateway's migrations


async def migrate(connection: asyncpg.Connection) -> int:
    """Apply the migrations this database lacks; return its schema version."""
    async with connection.transaction():
        await connection.execute("SELECT pg_advisory_xact_lock($1)", _LOCK)
        await connection.execute(
            "CREATE TABLE IF NOT EXISTS gateway_schema (version integer NOT NULL, applied_at timestamptz NOT NULL"
            " DEFAULT now())"
        )
        current = await connection.fetchval("SELECT coalesce(max(version), 0) FROM gateway_schema")
        for version, statement in enumerate(MIGRATIONS, start=1):
            if version > current:
                await connection.execute(statement)
                await connection.execute("INSERT INTO gateway_schema (version) VALUES ($1)", version)
        return len(MIGRATIONS)

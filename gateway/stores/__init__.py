"""The real servers behind the gateway: Redis (limits), PostgreSQL (ledger, tenants made through the API)."""

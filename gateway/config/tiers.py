"""The subscription tiers every gateway knows (seed 001's table); tenants.yaml may change any number or add tiers.

API calls per day, the monthly budget (the top of each tier's price band) and the features come from the tier
table; the per-minute, per-hour and concurrency limits are the gateway's own defaults, scaled the same way.
"""

from __future__ import annotations

BUILTIN_TIERS: dict[str, dict] = {
    "basic": {
        "limits": {
            "requests_per_minute": 60,
            "tokens_per_minute": 40_000,
            "tokens_per_hour": 1_000_000,
            "concurrent_requests": 5,
            "calls_per_day": 1_000,
            "monthly_budget_usd": 100.0,
            "completion_reservation": 1024,
        },
        "features": ["router"],
    },
    "professional": {
        "limits": {
            "requests_per_minute": 600,
            "tokens_per_minute": 400_000,
            "tokens_per_hour": 10_000_000,
            "concurrent_requests": 25,
            "calls_per_day": 10_000,
            "monthly_budget_usd": 600.0,
            "completion_reservation": 1024,
        },
        "features": ["router", "analytics"],
    },
    "enterprise": {
        "limits": {
            "requests_per_minute": 6_000,
            "tokens_per_minute": 4_000_000,
            "tokens_per_hour": 100_000_000,
            "concurrent_requests": 200,
            "calls_per_day": 100_000,
            "monthly_budget_usd": 4_000.0,
            "completion_reservation": 1024,
        },
        "features": ["router", "analytics", "sso", "custom_model"],
    },
}

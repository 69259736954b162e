"""Workload identity: SPIFFE IDs, the built-in CA (sans-IO) and its files (docs/security.md)."""

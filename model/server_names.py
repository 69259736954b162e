"""TLS server names as filter_chain_match takes them (exact names and `*.suffix`). Pure.

xds/ translation checks names with it, agent/proxy/sni_routing.py matches connections against them."""

from __future__ import annotations

MAX_SERVER_NAME = 253


def server_name_error(name: str) -> str | None:
    """Why `name` cannot be a filter_chain_match server name (Envoy accepts exact names and `*.suffix`)."""
    if not name:
        return "empty server name"
    if len(name) > MAX_SERVER_NAME:
        return f"longer than {MAX_SERVER_NAME} characters"
    rest = name[2:] if name.startswith("*.") else name
    if not rest or "*" in rest:
        return f"{name!r}: only exact names and '*.suffix' wildcards are supported"
    if any(c.isspace() for c in name) or ".." in name or rest.startswith(".") or name.endswith("."):
        return f"{name!r} is not a DNS name"
    return None

"""What the agent's xDS and CSR code names about certificates without handling one: the TTL limits, the error
type, the clock. Apart from agent/identity/ca.py so that an agent that never sees a certificate (an xDS
bootstrap without `ca:` and without TLS Secrets) never imports `cryptography` (~8 MB of RSS, issue #15)."""

from __future__ import annotations

import datetime as dt

DEFAULT_WORKLOAD_TTL_S = 24 * 3600  # istio-agent's default workload certificate TTL (SECRET_TTL)
MAX_WORKLOAD_TTL_S = 90 * 86400  # istiod's MAX_WORKLOAD_CERT_TTL default: 90 days


class CertError(ValueError):
    """A certificate, key or chain is unusable; the message says which and why."""


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)

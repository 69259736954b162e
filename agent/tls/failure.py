"""The TLS engine's one exception type, importable without loading the engine (agent/proxy/tls_lazy.py)."""


class TlsFailure(ConnectionError):
    """A TLS handshake or record failed; the message is OpenSSL's reason (e.g. "certificate verify failed")."""

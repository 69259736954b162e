"""The TLS engine (pyOpenSSL over the cryptography wheel's OpenSSL): engine.py (sans-IO), transport.py (asyncio),
failure.py (its exception, light). Kept light: agent/proxy/tls_lazy.py loads engine and transport on first use."""

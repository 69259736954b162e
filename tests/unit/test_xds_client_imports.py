"""The agent's xDS client, CSR client and WDS client import neither grpcio nor `cryptography` (issue #15: ~8.6 and
~8 MB of the agent's RSS); the first certificate or TLS Secret loads `cryptography`. A fresh interpreter each."""

from __future__ import annotations

import subprocess
import sys

CHECK = """
import sys
import planemesh.xds.transport, planemesh.agent.identity.cert_client, planemesh.agent.hbone.wds_client
print(sorted({m.split('.')[0] for m in sys.modules} & {'grpc', 'cryptography'}))
from planemesh.xds.translate_tls import translate_secret
from planemesh.xds.sds_secrets import root_secret
try:
    translate_secret(root_secret(b"not a certificate"), "secret[ROOTCA]")
except Exception as exc:
    print(type(exc).__name__, exc)
print(sorted({m.split('.')[0] for m in sys.modules} & {'grpc', 'cryptography'}))
"""


def test_the_clients_load_neither_grpcio_nor_cryptography_until_a_certificate_is_read() -> None:
    argv = [sys.executable, "-P", "-c", CHECK]  # -P: the installed packages, never the checkout's folders
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True).stdout.splitlines()
    assert out[0] == "[]"
    assert out[1].startswith("ConfigError secret[ROOTCA].validation_context.trusted_ca")  # named, and NACKed
    assert out[2] == "['cryptography']"

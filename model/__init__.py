"""planemesh.model: the configuration model every layer shares (planes and SLAs, listeners, routes, clusters,
TLS settings, their validation, the static YAML reader, the snapshot's JSON form).

It imports nothing of planemesh but itself, so the data plane (agent/proxy), translation (xds/), the kernel
side (ebpf/, netplanes/) and the labs read one model without importing the daemon's folder (agent/).
tests/unit/test_layers.py guards it."""

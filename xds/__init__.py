"""planemesh.xds: xDS client (sans-IO state machine + grpc.aio transport), translation, management server.

The top-level import name `xds` belongs to the xds-protos distribution (its `xds.core.v3` messages are imported
by every Envoy API module); this folder is only ever imported as `planemesh.xds`. Nothing puts the repository
root on sys.path (planemesh.module_argv, pytest's importlib import mode, scripts/run_module.py), so `import xds`
is always xds-protos: tests/unit/test_package_layout.py.
"""

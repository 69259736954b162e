"""Helpers shared by every test tier (and bench/): one copy each (issue #12).

    procs.py     dev_module_argv: run a module of tests/ or bench/ in a child without the repo root on sys.path
    waiting.py   wait_for, wait_port: poll until true / until a TCP port accepts
    net.py       free_port
    servers.py   accept-loop servers on loopback (echo, canned HTTP reply, silent)
    ads.py       FakeAdsStream: an in-memory ADS stream that drives the xDS client without a gRPC server
    watchdog.py  arm: a hung run (or exit) ends with every thread's stack and status 1 (tests/conftest.py)
"""

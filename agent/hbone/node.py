"""The HBONE node process: the composition root of the capture, the pool, the outbound and inbound listeners.

    python -m planemesh.agent.hbone --config hbone.yaml [--stats FILE] [--netns NS] [--pin-dir DIR]

Runs in the node's network namespace (as the agent does); SIGTERM closes the listeners, the pooled
connections and the capture datapath.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from pathlib import Path

import uvloop
import yaml
from pyroute2 import netns

from planemesh.agent.hbone.capture import CaptureDatapath
from planemesh.agent.hbone.certs import CaCertSource
from planemesh.agent.hbone.inbound import Inbound
from planemesh.agent.hbone.outbound import Outbound, Pool
from planemesh.agent.hbone.routes import HboneConfigError
from planemesh.agent.hbone.settings import HboneSettings, parse_settings
from planemesh.agent.hbone.stats import HboneStats
from planemesh.agent.identity.ca import CertError
from planemesh.agent.identity.ca_files import read_ca
from planemesh.model.config import ConfigError

log = logging.getLogger("planemesh.hbone")
STATS_PERIOD_S = 0.5


def load_settings(path: Path) -> HboneSettings:
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise HboneConfigError(f"{path}: {exc}") from None
    return parse_settings(raw)


async def _write_stats(stats: HboneStats, path: Path) -> None:
    while True:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(stats.as_dict()))
        os.replace(tmp, path)
        await asyncio.sleep(STATS_PERIOD_S)


async def serve(settings: HboneSettings, stats_path: Path | None, ready: str | None = None) -> None:
    ca = read_ca(settings.ca_dir)
    certs = CaCertSource(ca, settings.identity, settings.cert_ttl_s)
    stats = HboneStats()
    inbound = Inbound(lambda: settings.routes, lambda: settings.rbacs, certs, stats)
    await inbound.start(*settings.listen)
    outbound = None
    if settings.capture is not None:
        outbound = Outbound(settings.routes, Pool(certs, stats), stats)
        await outbound.start(settings.capture.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    writer = loop.create_task(_write_stats(stats, stats_path)) if stats_path else None
    log.info("HBONE node %s listening on %s:%d", settings.identity, *settings.listen)
    print(ready or "hbone ready", flush=True)
    await stop.wait()
    if writer is not None:
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await writer
    if outbound is not None:
        await outbound.close()
    await inbound.close()
    if stats_path:
        stats_path.write_text(json.dumps(stats.as_dict()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="planemesh-hbone", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, type=Path)
    parser.add_argument("--stats", type=Path, help="write the counters (JSON) here every 0.5 s")
    parser.add_argument("--pin-dir", help="bpffs directory for the capture program's pins")
    parser.add_argument("--netns", help="run in this network namespace (setns, as the agent's --netns)")
    args = parser.parse_args(argv)
    if args.netns:
        netns.setns(args.netns)  # the whole process, before any socket or thread exists
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    try:
        settings = load_settings(args.config)
        read_ca(settings.ca_dir)  # a missing or expired CA is a clear exit 2, not a traceback
    except (HboneConfigError, ConfigError, CertError, OSError) as exc:
        print(f"planemesh-hbone: {exc}", file=sys.stderr)
        return 2
    capture = None
    if settings.capture is not None:
        capture = CaptureDatapath(settings.capture, settings.routes, args.pin_dir)
    try:
        uvloop.run(serve(settings, args.stats))
    finally:
        if capture is not None:
            capture.close()
    return 0

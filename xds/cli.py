"""`planemesh xds-server`: the management server's subcommand (agent/cli.py discovers this module)."""

from __future__ import annotations

import argparse

from planemesh.xds.server import add_arguments, run_from_args


def add_xds_server_command(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "xds-server",
        help="serve Envoy resources from a directory over ADS (SotW and Delta)",
        description="Serve the Envoy resources of a directory (YAML/JSON, each with @type) over ADS; "
        "changes are pushed within a second, broken files are reported and the last good set is kept.",
    )
    add_arguments(parser)
    parser.set_defaults(func=lambda args: run_from_args(parser, args))
